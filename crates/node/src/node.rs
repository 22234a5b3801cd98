//! [`Node`]: every crate composed into a running Tern node.
//!
//! [`Node::start`] takes a checked configuration and, in order:
//!
//! 1. prepares the data directory and loads (or creates) the node's
//!    Ed25519 key, one identity for both transports;
//! 2. installs the metrics registry and serves `/metrics`;
//! 3. builds one [`Dispatcher`] with every service (Health, Status, Vm,
//!    Monitoring, Cluster, Raft) and binds the transports `[listen]` names;
//!    Health, Status and Vm answer `Unavailable` until Raft runs;
//! 4. builds the [`DualRouter`] over the transports' clients with the
//!    configured policy, and starts its probes;
//! 5. starts Raft: resumes when the data directory has a node id (and,
//!    if its addresses changed since, asks the leader to record the new
//!    ones), initialises a new single-node cluster when `cluster.join` is empty,
//!    otherwise joins through the seeds with the join token (retrying with
//!    capped backoff, logging each attempt);
//! 6. starts the reconciler with the configured runtime, and copies the
//!    Health service's reports into the gRPC transport's
//!    `grpc.health.v1`;
//! 7. follows the cluster's desired transport policy for this node
//!    unless its file pins `[transport]` (`tern_services::policy`), and
//!    records its `[node] labels` in the cluster state when they differ;
//! 8. writes [`NODE_INFO_FILE`] in the data directory, so that the CLI
//!    and the demo find the node's addresses from its data directory.
//!
//! [`Node::shutdown`] hands Raft leadership over (a leader), stops the
//! reconciler, then drains in-flight calls and closes both transports
//! within the deadline.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tern_cluster::{FIRST_NODE_ID, JoinToken, RaftNode, RaftOptions, RaftServices};
use tern_protocol::access::Role;
use tern_protocol::peer::IrohAddr;
use tern_protocol::{
    BoxFuture, Dispatcher, Handler, Method, PeerAddr, PeerId, RequestContext, RpcClient, ServiceId,
    Status, StreamReceiver, StreamSender, TransportKind, pb,
};
use tern_runtime::microvm::{DEFAULT_QEMU, MicrovmConfig, MicrovmRuntime, qemu_available};
use tern_runtime::process::{ProcessRuntime, RunAs};
use tern_runtime::{NodeNetwork, RestartPolicy, Runtime, RuntimeKind};
use tern_services::access::AccessGate;
use tern_services::health::HealthService;
use tern_services::monitoring::Monitoring;
use tern_services::node_info::NodeInfo;
use tern_services::policy::{PolicyControl, PolicySink, announce_labels};
use tern_services::reconciler::{Reconciler, ReconcilerConfig};
use tern_services::status::StatusService;
use tern_services::vm::VmService;
use tern_state::{Capacity, Command, Member, PolicySource};
use tern_transport_dual::{DualRouter, Policy};
use tern_transport_grpc::{GrpcTransport, ServerConfig};
use tern_transport_iroh::{IrohConfig, IrohTransport, load_or_create_secret_key};
use tokio::sync::watch;

use crate::config::{
    Checked, ConfigError, DEFAULT_PROCESS_USER, NetworkSection, RuntimeChoice, RuntimeName,
    VmConfig, prepare_data_dir,
};
use tern_cluster::RaftConsensus;
use tern_protocol::metric_names::NODE_ROLE;

use crate::agent::AgentLink;
use crate::config::Role as NodeRole;

/// The file in the data directory where a running node writes its
/// identity and addresses ([`NodeFile`], JSON).
pub const NODE_INFO_FILE: &str = "node.json";

/// Sub-directory of the data directory holding the Raft log and state.
pub const RAFT_DIR: &str = "raft";

/// Sub-directory of the data directory holding the VM runtimes' state.
pub const VMS_DIR: &str = "vms";

/// First delay between join attempts; doubled per failed attempt.
pub const JOIN_BACKOFF_MIN: Duration = Duration::from_millis(500);

/// Longest delay between join attempts: a seed that is restarting is
/// retried often enough to join soon after it is back.
pub const JOIN_BACKOFF_MAX: Duration = Duration::from_secs(10);

/// How long a joining node gives up after: long enough for a seed to be
/// restarted by its supervisor, short enough that a wrong seed or token
/// is reported rather than retried forever.
pub const JOIN_GIVE_UP: Duration = Duration::from_secs(300);

/// How long a joiner waits to be promoted to voter once it is a learner
/// (a learner far behind first receives a snapshot).
pub const PROMOTION_WAIT: Duration = Duration::from_secs(120);

/// How long the first node of a new cluster waits to elect itself.
pub const SELF_ELECTION_WAIT: Duration = Duration::from_secs(30);

/// Default deadline of [`Node::shutdown`] as `tern run` uses it: a
/// leadership handoff (a few heartbeats) plus a drain of calls in flight.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration cannot work (names the key).
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// Something failed while starting (says what).
    #[error("{0}")]
    Failed(String),
    /// Raft stopped on its own while the node ran (a failed log write or
    /// sync): the node stopped and exits non-zero.
    #[error(
        "{0}; the node has stopped: fix the cause, then start it again (it resumes from its data directory)"
    )]
    RaftFailed(String),
}

fn failed(what: &str, e: impl std::fmt::Display) -> StartError {
    StartError::Failed(format!("{what}: {e}"))
}

/// What a running node writes to [`NODE_INFO_FILE`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeFile {
    /// The node's identity (64 hex digits).
    pub id: String,
    /// Its gRPC URL, when it serves gRPC.
    pub grpc: Option<String>,
    /// Its iroh direct addresses, when it serves iroh.
    pub iroh: Option<Vec<SocketAddr>>,
    /// Its `/metrics` address, when served.
    pub metrics: Option<SocketAddr>,
    /// The process id of the node.
    pub pid: u32,
}

impl NodeFile {
    /// The node's address for the CLI.
    pub fn peer_addr(&self) -> Result<PeerAddr, crate::error::CliError> {
        let id: PeerId = self
            .id
            .parse()
            .map_err(|e| crate::error::CliError::File(format!("{NODE_INFO_FILE}: id: {e}")))?;
        Ok(PeerAddr {
            id,
            iroh: self.iroh.clone().map(|direct| IrohAddr {
                direct,
                relay_url: None,
            }),
            grpc: self.grpc.clone(),
        })
    }

    /// Reads the file a node wrote in `data_dir`.
    pub fn read(data_dir: &Path) -> Result<NodeFile, crate::error::CliError> {
        use crate::error::CliError;
        let path = data_dir.join(NODE_INFO_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            CliError::File(format!(
                "cannot read {}: {e}; is a node running with this data directory (`tern run`)?",
                path.display()
            ))
        })?;
        serde_json::from_str(&text).map_err(|e| CliError::File(format!("{}: {e}", path.display())))
    }

    fn write(&self, data_dir: &Path) -> std::io::Result<()> {
        let path = data_dir.join(NODE_INFO_FILE);
        let tmp = data_dir.join(format!("{NODE_INFO_FILE}.tmp"));
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, text)?;
        std::fs::rename(tmp, path)
    }
}

/// A handler set once Raft runs; until then every call is `Unavailable`.
#[derive(Default)]
struct Late {
    inner: OnceLock<Arc<dyn Handler>>,
}

impl Handler for Late {
    fn handle(
        &self,
        ctx: RequestContext,
        method: &'static Method,
        payload: Bytes,
    ) -> BoxFuture<'static, Result<Bytes, Status>> {
        match self.inner.get() {
            Some(h) => h.handle(ctx, method, payload),
            None => Box::pin(std::future::ready(Err(Status::unavailable(
                "the node is starting (Raft is not running yet); retry shortly",
            )))),
        }
    }

    /// Streams (`Vm/Watch`) pass through as calls do.
    fn handle_stream(
        &self,
        ctx: RequestContext,
        method: &'static Method,
        request: Bytes,
        inbound: StreamReceiver,
        outbound: StreamSender,
    ) -> BoxFuture<'static, Result<(), Status>> {
        match self.inner.get() {
            Some(h) => h.handle_stream(ctx, method, request, inbound, outbound),
            None => Box::pin(std::future::ready(Err(Status::unavailable(
                "the node is starting (Raft is not running yet); retry shortly",
            )))),
        }
    }
}

/// The node's facts for Health and Status.
struct Facts {
    address: PeerAddr,
    router: DualRouter,
    control: Arc<PolicyControl>,
    started: Instant,
    role: RoleFacts,
}

/// What only one role knows: a server's heartbeat ages of agents (when
/// it leads), an agent's own heartbeat age.
enum RoleFacts {
    Server(RaftServices),
    Agent(Arc<AgentLink>),
}

/// The router as the place a policy is applied.
struct RouterSink {
    router: DualRouter,
    serves_iroh: bool,
}

impl PolicySink for RouterSink {
    fn current(&self) -> Policy {
        (*self.router.policy()).clone()
    }

    fn apply(&self, policy: Policy) {
        self.router.set_policy(policy);
    }

    fn serves_iroh(&self) -> bool {
        self.serves_iroh
    }
}

impl NodeInfo for Facts {
    fn address(&self) -> pb::PeerAddress {
        pb::PeerAddress::from(&self.address)
    }

    fn policy(&self) -> pb::TransportPolicy {
        policy_to_pb(&self.router.policy())
    }

    fn policy_source(&self) -> String {
        self.control.source().to_string()
    }

    fn transports(&self) -> Vec<pb::TransportHealth> {
        let mut out = Vec::new();
        if self.address.grpc.is_some() {
            out.push(pb::TransportHealth {
                transport: pb::Transport::Grpc as i32,
                state: pb::ServingState::Serving as i32,
                detail: String::new(),
            });
        }
        if self.address.iroh.is_some() {
            out.push(pb::TransportHealth {
                transport: pb::Transport::Iroh as i32,
                state: pb::ServingState::Serving as i32,
                detail: String::new(),
            });
        }
        out
    }

    fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").to_owned()
    }

    fn started(&self) -> Instant {
        self.started
    }

    fn agent_heartbeat_ages(&self) -> std::collections::BTreeMap<u64, Duration> {
        match &self.role {
            RoleFacts::Server(services) => services.agent_heartbeat_ages(),
            RoleFacts::Agent(_) => std::collections::BTreeMap::new(),
        }
    }

    fn heartbeat_age(&self) -> Option<Duration> {
        match &self.role {
            RoleFacts::Server(_) => None,
            RoleFacts::Agent(link) => link.heartbeat_age(),
        }
    }
}

/// A policy as `tern.v1.TransportPolicy`.
pub fn policy_to_pb(policy: &Policy) -> pb::TransportPolicy {
    let c = policy.to_config();
    pb::TransportPolicy {
        mode: c.mode.as_str().to_owned(),
        prefer_iroh: c.migration.prefer_iroh,
        raft_transport: c.migration.raft_transport.as_str().to_owned(),
        fallback_to_grpc: c.migration.fallback_to_grpc,
    }
}

/// A running node.
pub struct Node {
    data_dir: PathBuf,
    address: PeerAddr,
    metrics_addr: Option<SocketAddr>,
    router: DualRouter,
    control: Arc<PolicyControl>,
    core: Core,
    grpc: Option<GrpcTransport>,
    iroh: Option<IrohTransport>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.address.id.short())
            .field("node", &self.raft_id())
            .finish_non_exhaustive()
    }
}

/// What runs the node's share of the cluster: Raft (a server) or the
/// link to the servers (an agent).
enum Core {
    Server {
        raft: Arc<RaftNode>,
        consensus: Arc<RaftConsensus>,
    },
    Agent {
        link: Arc<AgentLink>,
    },
}

/// Resolves when `stop` turns true (or its sender is gone).
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// The runtimes `vm` enables, and the default kind for specs naming none.
/// The process runtime exists only when enabled, and runs workloads as
/// `vm.process_user` (default `nobody`) when the node is root; microvm
/// files are confined to `vm.image_dirs`.
fn runtimes(
    vm: &VmConfig,
    vms: &Path,
    data_dir: &Path,
    network: Option<Arc<NodeNetwork>>,
) -> Result<(RuntimeKind, Vec<Arc<dyn Runtime>>), StartError> {
    let mut out: Vec<Arc<dyn Runtime>> = Vec::new();
    let mut kinds = Vec::new();
    for name in vm.enabled() {
        match name {
            RuntimeName::Microvm => {
                let config = MicrovmConfig {
                    allowed_dirs: Some(image_dirs(vm, data_dir)?),
                    network: network.clone(),
                    ..MicrovmConfig::default()
                };
                if !qemu_available(Path::new(DEFAULT_QEMU)) {
                    tracing::warn!(
                        "the microvm runtime is enabled but QEMU is not installed; VMs placed here will fail until it is"
                    );
                }
                out.push(Arc::new(MicrovmRuntime::with_config(
                    vms.join("microvm"),
                    config,
                )));
                kinds.push(RuntimeKind::Microvm);
            }
            RuntimeName::Process => {
                let run_as = process_user(vm)?;
                match &run_as {
                    Some(r) => {
                        tracing::info!(user = %r.user, uid = r.uid, "the process runtime is enabled; workloads run as this user")
                    }
                    None => tracing::warn!(
                        "the process runtime is enabled; workloads run as the node's own (non-root) user"
                    ),
                }
                out.push(Arc::new(ProcessRuntime::with_network(
                    vms.join("process"),
                    RestartPolicy::default(),
                    run_as,
                    network.clone(),
                )));
                kinds.push(RuntimeKind::Process);
            }
        }
    }
    let default = match vm.runtime {
        RuntimeChoice::Process => RuntimeKind::Process,
        RuntimeChoice::Microvm => RuntimeKind::Microvm,
        RuntimeChoice::Auto => kinds.first().copied().unwrap_or(RuntimeKind::Microvm),
    };
    Ok((default, out))
}

/// The directories microvm files may come from, each present: the default
/// (`DATA_DIR/images`) is created; a configured one that does not exist
/// stops the start (every VM would otherwise be refused as "outside").
fn image_dirs(vm: &VmConfig, data_dir: &Path) -> Result<Vec<PathBuf>, StartError> {
    let dirs = vm.image_dirs(data_dir);
    for (i, dir) in dirs.iter().enumerate() {
        let error = |reason: String| {
            StartError::Config(ConfigError {
                file: None,
                key: format!("vm.image_dirs[{i}]"),
                reason,
            })
        };
        if vm.image_dirs.is_none() {
            std::fs::create_dir_all(dir)
                .map_err(|e| error(format!("cannot create {}: {e}", dir.display())))?;
        } else if !dir.is_dir() {
            return Err(error(format!(
                "{} is not a directory on this node; create it or fix the path",
                dir.display()
            )));
        }
    }
    Ok(dirs)
}

/// The user process workloads run as: none when the node is not root (it
/// cannot switch users, and its own user is not root); otherwise
/// `vm.process_user`, `nobody` by default.
fn process_user(vm: &VmConfig) -> Result<Option<RunAs>, StartError> {
    let config_error = |reason: String| {
        StartError::Config(ConfigError {
            file: None,
            key: "vm.process_user".into(),
            reason,
        })
    };
    if !rustix::process::getuid().is_root() {
        return match &vm.process_user {
            None => Ok(None),
            Some(user) => Err(config_error(format!(
                "{user:?} needs the node to run as root to switch users; remove the key to run workloads as the node's own user"
            ))),
        };
    }
    let user = vm.process_user.as_deref().unwrap_or(DEFAULT_PROCESS_USER);
    RunAs::lookup(user)
        .map(Some)
        .map_err(|e| config_error(e.to_string()))
}

impl Node {
    /// Starts a node as the module docs describe.
    pub async fn start(checked: Checked) -> Result<Node, StartError> {
        let started = Instant::now();
        let pin = checked.pin();
        let Checked {
            config,
            policy,
            seeds,
            admins,
        } = checked;
        let data_dir = config.data_dir.clone();
        prepare_data_dir(&data_dir)?;
        let key = load_or_create_secret_key(&data_dir).map_err(|e| {
            StartError::Config(ConfigError {
                file: None,
                key: "data_dir".into(),
                reason: format!("cannot load or create the node key: {e}"),
            })
        })?;

        let monitoring = Monitoring::install().map_err(|e| failed("metrics registry", e))?;
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let mut metrics_addr = None;
        if let Some(addr) = config.listen.metrics.addr() {
            let listener = Monitoring::bind(addr).await.map_err(|e| {
                StartError::Config(ConfigError {
                    file: None,
                    key: "listen.metrics".into(),
                    reason: e.to_string(),
                })
            })?;
            metrics_addr = listener.local_addr().ok();
            let m = monitoring.clone();
            tasks.push(tokio::spawn(
                m.serve_http(listener, stopped(stop_rx.clone())),
            ));
        }

        let agent = config.node.role == NodeRole::Agent;
        let raft_services = RaftServices::with_settings(
            admission(&config.cluster),
            agent_settings(&config.cluster),
        );
        let health = Arc::new(Late::default());
        let status = Arc::new(Late::default());
        let vm = Arc::new(Late::default());
        let services = Dispatcher::new()
            .register(ServiceId::Health, health.clone())
            .register(ServiceId::Status, status.clone())
            .register(ServiceId::Monitoring, monitoring.handler());
        // An agent serves no Raft, Cluster or VM calls: the servers do.
        let dispatcher = if agent {
            services
        } else {
            raft_services.register(services.register(ServiceId::Vm, vm.clone()))
        };
        // One access check in front of every service, for both transports.
        let gate = Arc::new(AccessGate::new(Arc::new(dispatcher)));
        let handler: Arc<dyn Handler> = gate.clone();

        let mut address = PeerAddr::new(PeerId::from_bytes([0; 32]));
        let grpc = match config.listen.grpc.addr() {
            Some(listen) => {
                let mut gc = ServerConfig::new(key, listen);
                gc.limits = config.limits.grpc();
                let t = GrpcTransport::bind(gc, handler.clone())
                    .await
                    .map_err(|e| {
                        StartError::Config(ConfigError {
                            file: None,
                            key: "listen.grpc".into(),
                            reason: format!("cannot listen on {listen}: {e}"),
                        })
                    })?;
                address.id = t.id();
                address.grpc = t.peer_addr().grpc;
                Some(t)
            }
            None => None,
        };
        let iroh = match config.listen.iroh.addr() {
            Some(listen) => {
                let mut ic = IrohConfig::new(key).with_bind_addr(listen);
                config.limits.apply_iroh(&mut ic.limits);
                ic.relay_url = config.iroh.relay_url.clone();
                if let Some(pem) = &config.iroh.relay_ca_cert {
                    ic.relay_ca_der = Some(read_pem_cert(pem)?);
                }
                let t = IrohTransport::bind(ic, handler.clone())
                    .await
                    .map_err(|e| {
                        StartError::Config(ConfigError {
                            file: None,
                            key: "listen.iroh".into(),
                            reason: e.to_string(),
                        })
                    })?;
                address.id = t.id();
                address.iroh = t.peer_addr().iroh;
                Some(t)
            }
            None => None,
        };
        tracing::info!(id = %address.id, grpc = ?address.grpc, iroh = ?address.iroh.as_ref().map(|i| &i.direct), "transports bound");

        let router = DualRouter::new(
            grpc.as_ref().map(|t| t.client() as Arc<dyn RpcClient>),
            iroh.as_ref().map(|t| t.client() as Arc<dyn RpcClient>),
            policy,
        );
        tasks.push(router.start_probing());
        let client: Arc<dyn RpcClient> = Arc::new(router.clone());
        metrics::gauge!(NODE_ROLE, "role" => if agent { "agent" } else { "server" }).set(1.0);
        if agent {
            return start_agent(AgentStart {
                config,
                seeds,
                pin,
                started,
                address,
                metrics_addr,
                router,
                client,
                grpc,
                iroh,
                gate,
                health,
                status,
                stop,
                stop_rx,
                tasks,
            })
            .await;
        }

        let capacity = Capacity {
            vcpus: config.capacity.vcpus,
            memory_mib: config.capacity.memory_mib,
        };
        let me = Member::new(address.clone(), capacity);
        let (log, sm) = tern_store::open(&data_dir.join(RAFT_DIR))
            .map_err(|e| failed("opening the Raft store", e))?;
        let options = RaftOptions::default();
        let existing =
            tern_cluster::read_node_id(&data_dir).map_err(|e| failed("reading the node id", e))?;
        let raft = match existing {
            Some(id) => {
                tracing::info!(node = id, "resuming Raft from the data directory");
                let node = RaftNode::start(&raft_services, id, log, sm, client.clone(), &options)
                    .await
                    .map_err(|e| failed("starting Raft", e))?;
                if node.is_demoted() {
                    let _ = node.shutdown().await;
                    return Err(demoted_error(id));
                }
                node
            }
            None if seeds.is_empty() => {
                tern_cluster::write_node_id(&data_dir, FIRST_NODE_ID)
                    .map_err(|e| failed("writing the node id", e))?;
                let node = RaftNode::start(
                    &raft_services,
                    FIRST_NODE_ID,
                    log,
                    sm,
                    client.clone(),
                    &options,
                )
                .await
                .map_err(|e| failed("starting Raft", e))?;
                node.initialize(me.clone())
                    .await
                    .map_err(|e| failed("initialising a new cluster", e))?;
                tracing::info!(
                    node = FIRST_NODE_ID,
                    "initialised a new single-node cluster"
                );
                node
            }
            None => {
                let token = config.cluster.join_token.clone().unwrap_or_default();
                let answer = join_with_retries(client.as_ref(), &seeds, &token, &me).await?;
                tern_cluster::write_node_id(&data_dir, answer.node_id)
                    .map_err(|e| failed("writing the node id", e))?;
                raft_services
                    .trust_until_first_membership(answer.members.iter().map(|(id, a)| (*id, a.id)));
                let node = RaftNode::start(
                    &raft_services,
                    answer.node_id,
                    log,
                    sm,
                    client.clone(),
                    &options,
                )
                .await
                .map_err(|e| failed("starting Raft", e))?;
                if answer.voter_pending {
                    tracing::info!(
                        node = answer.node_id,
                        "joined as learner; waiting for promotion"
                    );
                } else {
                    tracing::info!(
                        node = answer.node_id,
                        "joined as learner; the cluster has its max_voters voters, so this node \
                         stays a learner until an admin promotes it (tern cluster promote)"
                    );
                }
                node.wait_until_joined(answer.voter_pending, PROMOTION_WAIT)
                    .await
                    .map_err(|e| failed("waiting to join the membership", e))?;
                if answer.voter_pending {
                    tracing::info!(node = answer.node_id, "promoted to voter");
                }
                node
            }
        };
        let raft = Arc::new(raft);
        let consensus = RaftConsensus::new(raft.clone(), client.clone());
        let consensus_dyn: Arc<dyn tern_services::consensus::Consensus> = consensus.clone();
        gate.attach(consensus_dyn.clone());

        let control = PolicyControl::new(
            raft.id(),
            Arc::new(RouterSink {
                router: router.clone(),
                serves_iroh: iroh.is_some(),
            }),
            pin,
        );
        tasks.push(tokio::spawn(
            control
                .clone()
                .run(consensus_dyn.clone(), stopped(stop_rx.clone())),
        ));
        // The leader's judgement of agents (marks silent ones down).
        tasks.push(tokio::spawn(tern_cluster::agents::watch_agents(
            raft.clone(),
            stopped(stop_rx.clone()),
        )));
        // The rollout's driver acts only while this node leads.
        tasks.push(tokio::spawn(tern_cluster::rollout_driver::drive(
            raft.clone(),
            client.clone(),
            stopped(stop_rx.clone()),
        )));
        tasks.push(tokio::spawn(announce_labels(
            consensus_dyn.clone(),
            raft.id(),
            config.node.labels.clone(),
            format!(
                "labels-{}-{:016x}",
                raft.id(),
                u64::from_le_bytes(crate::client::random_bytes::<8>())
            ),
            stopped(stop_rx.clone()),
        )));
        let facts: Arc<dyn NodeInfo> = Arc::new(Facts {
            address: address.clone(),
            router: router.clone(),
            control: control.clone(),
            started,
            role: RoleFacts::Server(raft_services.clone()),
        });
        let network = node_network(&config.network)?;
        let (default_kind, runtimes) = runtimes(
            &config.vm,
            &data_dir.join(VMS_DIR),
            &data_dir,
            network.clone(),
        )?;
        let health_service = HealthService::new(consensus_dyn.clone(), facts.clone());
        let status_service = StatusService::new(consensus_dyn.clone(), facts.clone());
        let vm_service = VmService::new(consensus_dyn.clone(), default_kind);
        vm_service.set_forward(client.clone());
        let _ = health.inner.set(health_service.handler());
        let _ = status.inner.set(status_service.handler());
        let _ = vm.inner.set(vm_service.handler());

        if let Some(g) = &grpc {
            let mut reports = health_service.publish(stopped(stop_rx.clone()));
            let handle = g.server().health().clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let report = reports.borrow_and_update().clone();
                    handle.set_node(report.ready).await;
                    for (kind, up) in report.transports {
                        handle.set_transport(kind, up).await;
                    }
                    if reports.changed().await.is_err() {
                        return;
                    }
                }
            }));
        }

        // This node's addresses as they change (iroh follows the
        // interfaces; the gRPC URL is the configured one), kept true in the
        // membership: after a restart with other ports, and while running
        // when an interface's address changes.
        let (me_tx, me_rx) = watch::channel(me.clone());
        if let Some(t) = &iroh {
            let mut seen = t.watch_peer_addr();
            let me = me.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let mut now = me.clone();
                    now.addr.iroh = seen.borrow_and_update().iroh.clone();
                    me_tx.send_if_modified(|old| {
                        let changed = *old != now;
                        *old = now;
                        changed
                    });
                    tokio::select! {
                        r = seen.changed() => if r.is_err() { return },
                        () = me_tx.closed() => return,
                    }
                }
            }));
        }
        tasks.push(
            raft.keep_address_recorded(
                me_rx,
                config.cluster.join_token.clone().unwrap_or_default(),
            ),
        );

        let reconciler = Reconciler::new(
            raft.id(),
            consensus_dyn.clone(),
            runtimes,
            ReconcilerConfig::default(),
        );
        tasks.push(tokio::spawn(reconciler.run(stopped(stop_rx.clone()))));

        if existing.is_none() && seeds.is_empty() {
            let mut s = consensus_dyn.status();
            let _ = tokio::time::timeout(SELF_ELECTION_WAIT, s.wait_for(|s| s.leader_id.is_some()))
                .await;
        }
        if seeds.is_empty() {
            bootstrap_access(&raft, address.id, &admins, existing.is_none()).await?;
        }
        if network.is_some() {
            bootstrap_network(&raft, &config.network).await;
        }

        write_node_file(&data_dir, &address, metrics_addr)?;
        tracing::info!(node = raft.id(), id = %address.id, metrics = ?metrics_addr, "node running");
        Ok(Node {
            data_dir,
            address,
            metrics_addr,
            router,
            control,
            core: Core::Server { raft, consensus },
            grpc,
            iroh,
            stop,
            tasks,
        })
    }

    /// The node's identity and addresses.
    pub fn address(&self) -> &PeerAddr {
        &self.address
    }

    /// Where `/metrics` is served, if it is.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The router (its policy can be changed while the node runs).
    pub fn router(&self) -> &DualRouter {
        &self.router
    }

    /// The node's id (its Raft id on a server, its agent id on an agent).
    pub fn raft_id(&self) -> u64 {
        match &self.core {
            Core::Server { raft, .. } => raft.id(),
            Core::Agent { link } => link.node_id(),
        }
    }

    /// The node's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Resolves when Raft stopped on a failure (a failed log write or
    /// sync; see [`RaftNode::failure`]), with what failed. Health reports
    /// the node not live from then on; `tern run` stops the node and exits
    /// non-zero. Never resolves while Raft runs or after a clean shutdown.
    pub async fn raft_failure(&self) -> String {
        match &self.core {
            Core::Server { raft, .. } => raft.failure().await,
            // An agent has no Raft to fail.
            Core::Agent { .. } => std::future::pending().await,
        }
    }

    /// Resolves once this server has been demoted to an agent (`tern
    /// cluster demote`): it no longer votes and the cluster records it as
    /// an agent. `tern run` then stops it (see [`demoted_error`]). Never
    /// resolves on an agent.
    pub async fn demoted(&self) {
        match &self.core {
            Core::Server { raft, .. } => raft.demoted().await,
            Core::Agent { .. } => std::future::pending().await,
        }
    }

    /// Sets or removes the file's pin of the transport policy (what a
    /// SIGHUP read) and applies what follows: the pin, else the cluster's
    /// desired policy for this node, else the default. Needs no quorum.
    /// `Err` (nothing changes) when the policy uses iroh and the node
    /// serves none.
    pub fn set_pin(&self, pin: Option<Policy>) -> Result<(), String> {
        self.control.set_pin(pin)
    }

    /// Where the transport policy in force comes from.
    pub fn policy_source(&self) -> PolicySource {
        self.control.source()
    }

    /// Graceful shutdown within `deadline`: a leader hands leadership over
    /// first; then the reconciler and health publisher stop, and both
    /// transports drain their calls in flight and close.
    pub async fn shutdown(self, deadline: Duration) {
        let start = Instant::now();
        tracing::info!(node = self.raft_id(), "shutting down");
        let Node {
            core,
            grpc,
            iroh,
            stop,
            tasks,
            ..
        } = self;
        match core {
            Core::Server { raft, consensus } => {
                // Raft first, while the transports still carry the handoff.
                if let Err(e) = raft.hand_over_leadership().await {
                    tracing::warn!(error = %e, "leadership handoff did not finish; stopping anyway");
                }
                // The reconciler, health publisher and /metrics stop;
                // workloads keep running and are adopted when the node
                // starts again.
                let _ = stop.send(true);
                drop(consensus);
                let raft_left = deadline.saturating_sub(start.elapsed()) / 2;
                match tokio::time::timeout(raft_left, raft.raft().shutdown()).await {
                    Ok(Ok(())) => tracing::info!(node = raft.id(), "raft stopped"),
                    Ok(Err(e)) => tracing::warn!(error = %e, "Raft shutdown"),
                    Err(_) => tracing::warn!("Raft shutdown passed its deadline"),
                }
            }
            Core::Agent { link } => {
                // The link, reconciler and /metrics stop; workloads keep
                // running and are adopted when the agent starts again.
                let _ = stop.send(true);
                drop(link);
            }
        }
        let drain = deadline
            .saturating_sub(start.elapsed())
            .max(Duration::from_millis(100));
        let g = async {
            if let Some(g) = grpc {
                g.shutdown(drain).await;
            }
        };
        let i = async {
            if let Some(i) = iroh {
                i.shutdown(drain).await;
            }
        };
        tokio::join!(g, i);
        for t in tasks {
            t.abort();
        }
        tracing::info!(elapsed = ?start.elapsed(), "node stopped");
    }
}

/// What [`Node::start`] hands over to [`start_agent`] once the transports
/// and the router are up.
struct AgentStart {
    config: crate::config::Config,
    seeds: Vec<(PeerId, crate::config::SeedConfig)>,
    pin: Option<Policy>,
    started: Instant,
    address: PeerAddr,
    metrics_addr: Option<SocketAddr>,
    router: DualRouter,
    client: Arc<dyn RpcClient>,
    grpc: Option<GrpcTransport>,
    iroh: Option<IrohTransport>,
    gate: Arc<AccessGate>,
    health: Arc<Late>,
    status: Arc<Late>,
    stop: watch::Sender<bool>,
    stop_rx: watch::Receiver<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Starts an agent (`[node] role = "agent"`): registers with the servers,
/// then runs the link, the policy control and the reconciler over the
/// link's mirror (see [`crate::agent`]).
async fn start_agent(p: AgentStart) -> Result<Node, StartError> {
    let AgentStart {
        config,
        seeds,
        pin,
        started,
        address,
        metrics_addr,
        router,
        client,
        grpc,
        iroh,
        gate,
        health,
        status,
        stop,
        stop_rx,
        mut tasks,
    } = p;
    let data_dir = config.data_dir.clone();
    let capacity = Capacity {
        vcpus: config.capacity.vcpus,
        memory_mib: config.capacity.memory_mib,
    };
    let link = AgentLink::new(
        client.clone(),
        address.clone(),
        capacity,
        config.cluster.join_token.clone().unwrap_or_default(),
        seeds
            .iter()
            .map(|(id, seed)| seed_addr(*id, seed))
            .collect(),
    );
    let id = link.register().await.map_err(register_error)?;
    retire_server_store(&data_dir)?;
    let consensus: Arc<dyn tern_services::consensus::Consensus> = link.clone();
    gate.attach(consensus.clone());
    tasks.push(tokio::spawn(link.clone().run(stopped(stop_rx.clone()))));
    let sink = Arc::new(RouterSink {
        router: router.clone(),
        serves_iroh: iroh.is_some(),
    });
    let control = PolicyControl::new(id, sink, pin);
    let policy_task = control
        .clone()
        .run(consensus.clone(), stopped(stop_rx.clone()));
    tasks.push(tokio::spawn(policy_task));
    let facts: Arc<dyn NodeInfo> = Arc::new(Facts {
        address: address.clone(),
        router: router.clone(),
        control: control.clone(),
        started,
        role: RoleFacts::Agent(link.clone()),
    });
    let network = node_network(&config.network)?;
    let (_, runtimes) = runtimes(
        &config.vm,
        &data_dir.join(VMS_DIR),
        &data_dir,
        network.clone(),
    )?;
    let _ = health
        .inner
        .set(HealthService::new(consensus.clone(), facts.clone()).handler());
    let _ = status
        .inner
        .set(StatusService::new(consensus.clone(), facts.clone()).handler());
    let reconciler = Reconciler::new(id, consensus.clone(), runtimes, ReconcilerConfig::default());
    tasks.push(tokio::spawn(reconciler.run(stopped(stop_rx.clone()))));
    write_node_file(&data_dir, &address, metrics_addr)?;
    tracing::info!(node = id, id = %address.id, metrics = ?metrics_addr, "agent running");
    Ok(Node {
        data_dir,
        address,
        metrics_addr,
        router,
        control,
        core: Core::Agent { link },
        grpc,
        iroh,
        stop,
        tasks,
    })
}

/// Why a demoted server stops (at start, or once it learns of its
/// demotion while running): its config still says `role = "server"`.
pub fn demoted_error(id: u64) -> StartError {
    StartError::Config(ConfigError {
        file: None,
        key: "node.role".into(),
        reason: format!(
            "this node (node {id}) was demoted to an agent (tern cluster demote): set \
             role = \"agent\" under [node] and start it again; it keeps its node id and its VMs \
             and needs no join token"
        ),
    })
}

/// An agent whose data directory holds a Raft store and node id file from
/// its days as a server (it was demoted) moves both aside, into
/// `raft.server-UNIX_MS/`, with a log line: an agent never reads them, and
/// a later promotion back to server must join afresh rather than resume
/// from a log the cluster has moved past.
fn retire_server_store(data_dir: &Path) -> Result<(), StartError> {
    let raft = data_dir.join(RAFT_DIR);
    let id_file = data_dir.join(tern_cluster::node::NODE_ID_FILE);
    if !raft.exists() && !id_file.exists() {
        return Ok(());
    }
    let at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let aside = data_dir.join(format!("{RAFT_DIR}.server-{at}"));
    let moved = std::fs::create_dir_all(&aside)
        .and_then(|()| match raft.exists() {
            true => std::fs::rename(&raft, aside.join(RAFT_DIR)),
            false => Ok(()),
        })
        .and_then(|()| match id_file.exists() {
            true => std::fs::rename(&id_file, aside.join(tern_cluster::node::NODE_ID_FILE)),
            false => Ok(()),
        });
    moved.map_err(|e| failed("moving the Raft store of this node's server days aside", e))?;
    tracing::warn!(
        moved_to = %aside.display(),
        "this agent's data directory held a Raft store from its days as a server (it was \
         demoted); moved aside, never read again: remove it once the agent runs well"
    );
    Ok(())
}

/// Why an agent could not start, from why its registration failed.
fn register_error(e: crate::agent::RegisterError) -> StartError {
    match e {
        crate::agent::RegisterError::Refused(why) => StartError::Config(ConfigError {
            file: None,
            key: "cluster.join_token".into(),
            reason: format!("the cluster refused the agent: {why}"),
        }),
        e @ crate::agent::RegisterError::GaveUp { .. } => StartError::Failed(e.to_string()),
    }
}

/// Writes `DATA_DIR/node.json`: the node's identity, addresses and pid.
fn write_node_file(
    data_dir: &Path,
    address: &PeerAddr,
    metrics: Option<SocketAddr>,
) -> Result<(), StartError> {
    let file = NodeFile {
        id: address.id.to_string(),
        grpc: address.grpc.clone(),
        iroh: address.iroh.as_ref().map(|i| i.direct.clone()),
        metrics,
        pid: std::process::id(),
    };
    file.write(data_dir)
        .map_err(|e| failed("writing the node file", e))
}

/// A seed of `[cluster] join` as an address.
fn seed_addr(id: PeerId, seed: &crate::config::SeedConfig) -> PeerAddr {
    PeerAddr {
        id,
        grpc: seed.grpc.clone(),
        iroh: (!seed.iroh.is_empty()).then(|| IrohAddr {
            direct: seed.iroh.clone(),
            relay_url: None,
        }),
    }
}

/// The servers' agent settings from `[cluster]` (checked by the config).
fn agent_settings(cluster: &crate::config::ClusterConfig) -> tern_cluster::AgentSettings {
    tern_cluster::AgentSettings {
        heartbeat_interval: Duration::from_millis(cluster.agent_heartbeat_interval_ms),
        down_after: Duration::from_millis(cluster.agent_down_after_ms),
    }
}

/// The node's guest network, when `[network]` enables it.
fn node_network(section: &NetworkSection) -> Result<Option<Arc<NodeNetwork>>, StartError> {
    let Some(config) = section
        .runtime_config()
        .map_err(|e| failed("the network config", e))?
    else {
        return Ok(None);
    };
    let network = NodeNetwork::new(config).map_err(|e| failed("the network config", e))?;
    tracing::info!(bridge = %network.config().bridge, "guest networking is on");
    Ok(Some(Arc::new(network)))
}

/// Sets the cluster's address pool to `[network] pool` when none is set
/// yet (this node leading), or warns when the cluster's differs. A failure
/// is only logged: the pool is proposed again at the next start, and VMs
/// meanwhile get no address.
async fn bootstrap_network(raft: &RaftNode, section: &NetworkSection) {
    let Ok(pool) = section.pool() else {
        return;
    };
    let current = raft.state().read(|s| s.network().pool()).ok().flatten();
    match current {
        Some(current) if current == pool => return,
        Some(current) => {
            tracing::warn!(cluster = %current, configured = %pool, "the cluster's address pool differs from network.pool; the cluster's is used");
            return;
        }
        None => {}
    }
    let command = Command::SetNetworkPool {
        request_id: format!("bootstrap-pool-{pool}"),
        pool,
    };
    match tokio::time::timeout(ACCESS_BOOTSTRAP_WAIT, raft.client_write(command)).await {
        Ok(Ok(w)) => match w.data {
            tern_state::Response::Rejected(why) => {
                tracing::warn!(%pool, reason = %why, "the address pool was not set");
            }
            _ => tracing::info!(%pool, "the cluster's address pool is set"),
        },
        Ok(Err(e)) => {
            tracing::warn!(%pool, error = %e, "the address pool was not set (this node is not the leader?); it is proposed again at the next start");
        }
        Err(_) => {
            tracing::warn!(%pool, "the address pool was not committed within {ACCESS_BOOTSTRAP_WAIT:?}");
        }
    }
}

/// How long the first node waits for its access bootstrap to commit.
const ACCESS_BOOTSTRAP_WAIT: Duration = Duration::from_secs(10);

/// Grants the admin role to this node's key and to `[access] admins`, if
/// no key holds it yet: on a new cluster (`fresh`, where a failure stops
/// the start), and on a cluster that predates access control when its
/// first node restarts as leader (where a failure is only logged). Once a
/// key holds admin, the config is never read again for access.
async fn bootstrap_access(
    raft: &RaftNode,
    own: PeerId,
    admins: &[PeerId],
    fresh: bool,
) -> Result<(), StartError> {
    let has_admin = raft
        .state()
        .read(|s| s.access().values().any(|r| r.contains(&Role::Admin)))
        .map_err(|e| failed("reading the access table", e))?;
    if has_admin {
        return Ok(());
    }
    let at_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let mut keys = vec![own];
    keys.extend(admins.iter().copied().filter(|k| *k != own));
    for key in keys {
        let command = Command::ChangeAccess {
            request_id: format!("bootstrap-admin-{key}"),
            grant: true,
            key,
            role: Role::Admin,
            by: own,
            at_unix_ms,
        };
        let result = tokio::time::timeout(ACCESS_BOOTSTRAP_WAIT, raft.client_write(command)).await;
        let why = match result {
            Ok(Ok(w)) => match w.data {
                tern_state::Response::Rejected(r) => r.to_string(),
                _ => {
                    tracing::info!(key = %key, "access bootstrap: granted admin");
                    continue;
                }
            },
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("not committed within {ACCESS_BOOTSTRAP_WAIT:?}"),
        };
        if fresh {
            return Err(failed("bootstrapping the access table", why));
        }
        tracing::warn!(key = %key, reason = %why, "access bootstrap skipped (this node is not the leader?); it runs again at the next start");
        return Ok(());
    }
    Ok(())
}

/// Joins through `seeds` in turn, retrying with capped exponential
/// backoff until [`JOIN_GIVE_UP`]; a refused token is not retried.
async fn join_with_retries(
    client: &dyn RpcClient,
    seeds: &[(PeerId, crate::config::SeedConfig)],
    token: &str,
    me: &Member,
) -> Result<tern_cluster::JoinAnswer, StartError> {
    let give_up = Instant::now() + JOIN_GIVE_UP;
    let mut backoff = JOIN_BACKOFF_MIN;
    let mut attempt = 0u32;
    loop {
        for (id, seed) in seeds {
            attempt += 1;
            let addr = seed_addr(*id, seed);
            tracing::info!(attempt, seed = %id.short(), "asking to join the cluster");
            match tern_cluster::request_join(client, &addr, token, me).await {
                Ok(answer) => return Ok(answer),
                Err(tern_cluster::RaftNodeError::Call {
                    error: tern_protocol::CallError::Application(s),
                    ..
                }) if s.code == tern_protocol::Code::PermissionDenied => {
                    return Err(StartError::Config(ConfigError {
                        file: None,
                        key: "cluster.join_token".into(),
                        reason: format!("the cluster refused the join: {}", s.message),
                    }));
                }
                Err(e) => {
                    tracing::warn!(attempt, seed = %id.short(), error = %e, retry_in = ?backoff, "join failed")
                }
            }
        }
        if Instant::now() + backoff > give_up {
            return Err(StartError::Failed(format!(
                "no seed in cluster.join accepted the join within {JOIN_GIVE_UP:?} ({attempt} attempts); check that the seeds run and are reachable"
            )));
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(JOIN_BACKOFF_MAX);
    }
}

/// The first certificate of a PEM file, as DER.
fn read_pem_cert(path: &Path) -> Result<Vec<u8>, StartError> {
    let bad = |why: String| {
        StartError::Config(ConfigError {
            file: None,
            key: "iroh.relay_ca_cert".into(),
            reason: why,
        })
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| bad(format!("cannot read {}: {e}", path.display())))?;
    let body: String = text
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE-----"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    if body.is_empty() {
        return Err(bad(format!("{} holds no PEM certificate", path.display())));
    }
    base64_decode(&body).ok_or_else(|| bad(format!("{} is not valid PEM", path.display())))
}

/// Standard base64 (with padding), enough for a PEM body.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0u32;
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' | b'\r' | b'\n' | b' ' => continue,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(((acc >> bits) & 0xff) as u8);
        }
    }
    Some(out)
}

/// The data directory's runtime state, for tools that must find the
/// workloads a node left (the demo's clean-up).
pub fn runtime_dirs(data_dir: &Path) -> Vec<PathBuf> {
    vec![
        data_dir.join(VMS_DIR).join("process"),
        data_dir.join(VMS_DIR).join("microvm"),
    ]
}

/// Which transports a node file says the node serves.
pub fn served(file: &NodeFile) -> Vec<TransportKind> {
    let mut v = Vec::new();
    if file.grpc.is_some() {
        v.push(TransportKind::Grpc);
    }
    if file.iroh.is_some() {
        v.push(TransportKind::Iroh);
    }
    v
}

/// How this node admits joiners when it leads: the cluster's join tokens,
/// and its own `join_token` as a static token unless that is a created
/// token (`ID.SECRET`, which must keep expiring).
fn admission(cluster: &crate::config::ClusterConfig) -> tern_cluster::Admission {
    let static_token = cluster
        .join_token
        .clone()
        .filter(|t| tern_cluster::admission::parse_token(t).is_none())
        .and_then(JoinToken::new);
    if static_token.is_some() {
        tracing::warn!(
            "[cluster] join_token is a static secret: nodes presenting it may join through this \
             node for as long as it is configured; prefer expiring tokens (tern cluster token create)"
        );
    }
    tern_cluster::Admission {
        static_token,
        max_voters: cluster.max_voters,
        max_capacity: tern_state::Capacity {
            vcpus: cluster.max_node_vcpus,
            memory_mib: cluster.max_node_memory_mib,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_bodies_decode() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVs\nbG8h").unwrap(), b"hello!");
        assert!(base64_decode("a*b").is_none());
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("ca.pem");
        std::fs::write(
            &pem,
            "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        assert_eq!(read_pem_cert(&pem).unwrap(), b"hello");
        std::fs::write(&pem, "not a pem").unwrap();
        let e = read_pem_cert(&pem).unwrap_err().to_string();
        assert!(e.contains("iroh.relay_ca_cert"), "{e}");
    }

    #[test]
    fn a_node_file_names_the_node() {
        let dir = tempfile::tempdir().unwrap();
        let file = NodeFile {
            id: "cd".repeat(32),
            grpc: Some("https://127.0.0.1:1".into()),
            iroh: Some(vec!["127.0.0.1:2".parse().unwrap()]),
            metrics: None,
            pid: 42,
        };
        file.write(dir.path()).unwrap();
        let back = NodeFile::read(dir.path()).unwrap();
        assert_eq!(back, file);
        let addr = back.peer_addr().unwrap();
        assert!(addr.transports().grpc && addr.transports().iroh);
        assert_eq!(served(&back).len(), 2);
        let e = NodeFile::read(&dir.path().join("none"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("tern run"), "{e}");
    }
}
