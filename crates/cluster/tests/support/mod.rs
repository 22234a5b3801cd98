//! A cluster of real nodes in one process: each node has its own data
//! directory, its persistent key, a real transport on loopback (iroh or
//! gRPC, chosen by a [`TransportFactory`]) and a [`RaftNode`] on sled.
//! Shared by the integration tests and the benches.

#![allow(dead_code)] // reason: each test binary uses a different part
#![allow(unreachable_pub)] // reason: a module of test binaries, not a library

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use tern_cluster::{
    FIRST_NODE_ID, JoinToken, RaftNode, RaftOptions, RaftServices, read_node_id, write_node_id,
};
use tern_protocol::{Dispatcher, Handler, PeerAddr, RpcClient};
use tern_state::{Capacity, Command, Member, NodeId, Response, VmRecord, VmSpec, VmState};
use tern_transport_dual::DualRouter;
use tern_transport_dual::policy::{IrohServices, Mode, Policy, RaftTransport};
use tern_transport_grpc::{GrpcTransport, ServerConfig};
use tern_transport_iroh::{IrohConfig, IrohTransport, load_or_create_secret_key};

/// The join token every test cluster uses.
pub const TOKEN: &str = "correct horse battery staple";
/// Bound on every wait in the tests: generous, because the machine is
/// shared; never a statement about speed.
pub const WAIT: Duration = Duration::from_secs(60);
/// How long a transport drains at shutdown in tests.
pub const DRAIN: Duration = Duration::from_secs(2);

/// Starts one transport serving a handler.
pub trait TransportFactory: Send + Sync + 'static {
    /// A running transport.
    type Transport: Send + Sync + 'static;
    /// Name for logs and bench ids.
    const NAME: &'static str;
    /// Binds on `bind` (port 0 picks one) with identity `secret`.
    fn start(
        &self,
        secret: [u8; 32],
        bind: SocketAddr,
        handler: Arc<dyn Handler>,
    ) -> impl Future<Output = Self::Transport> + Send;
    /// The transport's client.
    fn client(t: &Self::Transport) -> Arc<dyn RpcClient>;
    /// How others reach it.
    fn addr(t: &Self::Transport) -> PeerAddr;
    /// The socket it is bound to (to restart on the same port).
    fn bound(t: &Self::Transport) -> SocketAddr;
    /// Graceful shutdown.
    fn stop(t: Self::Transport) -> impl Future<Output = ()> + Send;
}

/// iroh QUIC on loopback, no relay.
pub struct Iroh;

impl TransportFactory for Iroh {
    type Transport = IrohTransport;
    const NAME: &'static str = "iroh";

    async fn start(
        &self,
        secret: [u8; 32],
        bind: SocketAddr,
        handler: Arc<dyn Handler>,
    ) -> IrohTransport {
        // A restart binds the port its predecessor just released; the
        // socket may take a moment to be free.
        let deadline = tokio::time::Instant::now() + REBIND_PATIENCE;
        loop {
            match IrohTransport::bind(
                IrohConfig::new(secret).with_bind_addr(bind),
                handler.clone(),
            )
            .await
            {
                Ok(t) => return t,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!("binding iroh again: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("iroh binds on loopback: {e}"),
            }
        }
    }
    fn client(t: &IrohTransport) -> Arc<dyn RpcClient> {
        t.client()
    }
    fn addr(t: &IrohTransport) -> PeerAddr {
        t.peer_addr()
    }
    fn bound(t: &IrohTransport) -> SocketAddr {
        t.local_addr()
    }
    async fn stop(t: IrohTransport) {
        t.shutdown(DRAIN).await;
    }
}

/// gRPC (tonic) on loopback.
pub struct Grpc;

impl TransportFactory for Grpc {
    type Transport = GrpcTransport;
    const NAME: &'static str = "grpc";

    async fn start(
        &self,
        secret: [u8; 32],
        bind: SocketAddr,
        handler: Arc<dyn Handler>,
    ) -> GrpcTransport {
        GrpcTransport::bind(ServerConfig::new(secret, bind), handler)
            .await
            .expect("gRPC binds on loopback")
    }
    fn client(t: &GrpcTransport) -> Arc<dyn RpcClient> {
        t.client()
    }
    fn addr(t: &GrpcTransport) -> PeerAddr {
        t.peer_addr()
    }
    fn bound(t: &GrpcTransport) -> SocketAddr {
        t.local_addr()
    }
    async fn stop(t: GrpcTransport) {
        t.shutdown(DRAIN).await;
    }
}

/// Both transports behind the dual router, as a node in `mode = "dual"`
/// runs them: Raft prefers iroh, with fallback to gRPC on. gRPC listens on
/// the TCP port of iroh's UDP port, so one address restarts both.
pub struct Dual;

/// A running [`Dual`] node's transports.
pub struct DualTransport {
    pub iroh: IrohTransport,
    pub grpc: GrpcTransport,
    pub router: Arc<tern_transport_dual::DualRouter>,
}

/// How long a restarted dual node retries binding the ports its
/// predecessor just released (or a TCP port another test holds).
const REBIND_PATIENCE: Duration = Duration::from_secs(10);

impl TransportFactory for Dual {
    type Transport = DualTransport;
    const NAME: &'static str = "dual";

    async fn start(
        &self,
        secret: [u8; 32],
        bind: SocketAddr,
        handler: Arc<dyn Handler>,
    ) -> DualTransport {
        let deadline = tokio::time::Instant::now() + REBIND_PATIENCE;
        loop {
            let iroh = IrohTransport::bind(
                IrohConfig::new(secret).with_bind_addr(bind),
                handler.clone(),
            )
            .await;
            let iroh = match iroh {
                Ok(iroh) => iroh,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!("binding iroh again: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(e) => panic!("iroh binds on loopback: {e}"),
            };
            let tcp = SocketAddr::new(bind.ip(), iroh.local_addr().port());
            match GrpcTransport::bind(ServerConfig::new(secret, tcp), handler.clone()).await {
                Ok(grpc) => {
                    let router = Arc::new(DualRouter::new(
                        Some(grpc.client() as Arc<dyn RpcClient>),
                        Some(iroh.client() as Arc<dyn RpcClient>),
                        Policy {
                            mode: Mode::Dual,
                            prefer_iroh: IrohServices::AllExceptRaft,
                            raft_transport: RaftTransport::Iroh,
                            fallback_to_grpc: true,
                        },
                    ));
                    return DualTransport { iroh, grpc, router };
                }
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!("binding gRPC again: {e}");
                    iroh.shutdown(Duration::ZERO).await;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("gRPC binds on loopback: {e}"),
            }
        }
    }
    fn client(t: &DualTransport) -> Arc<dyn RpcClient> {
        t.router.clone()
    }
    fn addr(t: &DualTransport) -> PeerAddr {
        PeerAddr {
            grpc: Some(t.grpc.server().url()),
            ..t.iroh.peer_addr()
        }
    }
    fn bound(t: &DualTransport) -> SocketAddr {
        t.iroh.local_addr()
    }
    async fn stop(t: DualTransport) {
        t.iroh.shutdown(DRAIN).await;
        t.grpc.shutdown(DRAIN).await;
    }
}

/// Installs a log subscriber once (`RUST_LOG` filters; quiet by default).
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Loopback, any port.
pub fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A capacity for test members.
pub fn capacity() -> Capacity {
    Capacity {
        vcpus: 4,
        memory_mib: 4096,
    }
}

/// One node: data directory, key, transport, Raft.
pub struct TestNode<F: TransportFactory> {
    pub dir: PathBuf,
    pub bind: SocketAddr,
    pub addr: PeerAddr,
    pub services: RaftServices,
    pub transport: Option<F::Transport>,
    pub raft: Option<RaftNode>,
}

impl<F: TransportFactory> TestNode<F> {
    /// Binds the transport (same key and port as before on a restart) with
    /// fresh services; Raft is not started.
    pub async fn boot(factory: &F, dir: &Path, bind: SocketAddr) -> TestNode<F> {
        Self::boot_with(factory, dir, bind, RaftServices::new(JoinToken::new(TOKEN))).await
    }

    /// As [`TestNode::boot`], serving `services` (e.g. built with a
    /// particular admission).
    pub async fn boot_with(
        factory: &F,
        dir: &Path,
        bind: SocketAddr,
        services: RaftServices,
    ) -> TestNode<F> {
        std::fs::create_dir_all(dir).unwrap();
        let secret = load_or_create_secret_key(dir).unwrap();
        let dispatcher = services.register(Dispatcher::new());
        let transport = factory.start(secret, bind, Arc::new(dispatcher)).await;
        TestNode {
            dir: dir.to_owned(),
            bind: F::bound(&transport),
            addr: F::addr(&transport),
            services,
            transport: Some(transport),
            raft: None,
        }
    }

    pub fn client(&self) -> Arc<dyn RpcClient> {
        F::client(self.transport.as_ref().expect("running"))
    }

    pub fn member(&self) -> Member {
        Member::new(self.addr.clone(), capacity())
    }

    pub fn raft(&self) -> &RaftNode {
        self.raft.as_ref().expect("raft running")
    }

    pub fn is_up(&self) -> bool {
        self.raft.is_some()
    }

    /// The first node of a new cluster.
    pub async fn initialize(&mut self, options: &RaftOptions) {
        let (log, sm) = tern_store::open(&self.dir).unwrap();
        write_node_id(&self.dir, FIRST_NODE_ID).unwrap();
        let node = RaftNode::start(
            &self.services,
            FIRST_NODE_ID,
            log,
            sm,
            self.client(),
            options,
        )
        .await
        .unwrap();
        node.initialize(self.member()).await.unwrap();
        self.raft = Some(node);
    }

    /// Joins through `seed`.
    pub async fn join(&mut self, options: &RaftOptions, seed: &PeerAddr) {
        self.join_with(options, seed, TOKEN).await;
    }

    /// Joins through `seed` presenting `token`.
    pub async fn join_with(&mut self, options: &RaftOptions, seed: &PeerAddr, token: &str) {
        let (log, sm) = tern_store::open(&self.dir).unwrap();
        let node = RaftNode::join(
            &self.services,
            &self.dir,
            log,
            sm,
            self.client(),
            options,
            seed,
            token,
            &self.member(),
            WAIT,
        )
        .await
        .unwrap();
        self.raft = Some(node);
    }

    /// Restarts Raft from the saved node id and sled state.
    pub async fn resume(&mut self, options: &RaftOptions) {
        let id = read_node_id(&self.dir).unwrap().expect("a saved node id");
        let (log, sm) = tern_store::open(&self.dir).unwrap();
        let node = RaftNode::start(&self.services, id, log, sm, self.client(), options)
            .await
            .unwrap();
        self.raft = Some(node);
    }

    /// Stops Raft and the transport (a clean shutdown).
    pub async fn stop(&mut self) {
        if let Some(raft) = self.raft.take() {
            raft.shutdown().await.unwrap();
        }
        if let Some(t) = self.transport.take() {
            F::stop(t).await;
        }
    }

    /// Stops, then boots again on the same directory, key and port and
    /// resumes Raft.
    pub async fn restart(&mut self, factory: &F, options: &RaftOptions) {
        self.stop().await;
        let fresh = TestNode::<F>::boot(factory, &self.dir, self.bind).await;
        *self = fresh;
        self.resume(options).await;
    }

    /// Stops, then boots again on the same directory and key but a new
    /// port, and resumes Raft.
    pub async fn restart_elsewhere(&mut self, factory: &F, options: &RaftOptions) {
        self.stop().await;
        let fresh = TestNode::<F>::boot(factory, &self.dir, loopback()).await;
        *self = fresh;
        self.resume(options).await;
    }

    /// Number of VM records in this node's state machine.
    pub fn vm_count(&self) -> usize {
        self.raft().state().read(|s| s.vms().len()).unwrap()
    }

    /// Waits until this node holds `n` VM records.
    pub async fn wait_vms(&self, n: usize) {
        let raft = self.raft();
        let deadline = tokio::time::Instant::now() + WAIT;
        while raft.state().read(|s| s.vms().len()).unwrap() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {} holds {} VMs, waiting for {n}",
                raft.id(),
                self.vm_count()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A VM record command with a unique id and name.
pub fn put_vm(i: u64) -> Command {
    put_vm_in_slot(i, i)
}

/// Write `i` (a unique request id) of the record of VM `slot`: many writes
/// to few records keep the state small, so a bench measures Raft rather
/// than a growing state machine.
pub fn put_vm_in_slot(i: u64, slot: u64) -> Command {
    Command::PutVm {
        request_id: format!("req-{i}"),
        vm: Box::new(VmRecord {
            id: format!("vm-{slot}"),
            spec: VmSpec {
                name: format!("vm-{slot}"),
                vcpus: 1,
                memory_mib: 64,
                runtime: "process".into(),
                ..VmSpec::default()
            },
            node_id: 1,
            desired: VmState::Running,
            ..VmRecord::default()
        }),
    }
}

/// A cluster of test nodes.
pub struct Cluster<F: TransportFactory> {
    pub factory: F,
    pub options: RaftOptions,
    pub nodes: Vec<TestNode<F>>,
    _dir: tempfile::TempDir,
}

impl<F: TransportFactory> Cluster<F> {
    /// `n` nodes: the first initialises, the others join through it and
    /// are voters when this returns.
    pub async fn start(factory: F, n: usize, options: RaftOptions) -> Cluster<F> {
        let dir = tempfile::tempdir().unwrap();
        let mut nodes = Vec::new();
        for i in 0..n {
            let mut node =
                TestNode::boot(&factory, &dir.path().join(format!("node{i}")), loopback()).await;
            if i == 0 {
                node.initialize(&options).await;
                wait_leader_among(std::slice::from_ref(&node)).await;
            } else {
                let seed = nodes.first().map(|n: &TestNode<F>| n.addr.clone()).unwrap();
                node.join(&options, &seed).await;
            }
            nodes.push(node);
        }
        Cluster {
            factory,
            options,
            nodes,
            _dir: dir,
        }
    }

    /// Index of the current leader (waits for one all running nodes agree
    /// on).
    pub async fn leader(&self) -> usize {
        wait_leader_among(&self.nodes).await
    }

    /// Writes `cmd` through the leader, retrying across a leader change.
    pub async fn write(&self, cmd: Command) -> Response {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let leader = self.leader().await;
            match self.nodes[leader]
                .raft()
                .raft()
                .client_write(cmd.clone())
                .await
            {
                Ok(resp) => return resp.data,
                Err(e) => {
                    assert!(tokio::time::Instant::now() < deadline, "write failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Writes VMs `from..to`.
    pub async fn write_vms(&self, from: u64, to: u64) {
        self.write_padded_vms(from, to, 0).await;
    }

    /// Writes VMs `from..to`, each record carrying `pad` extra bytes.
    pub async fn write_padded_vms(&self, from: u64, to: u64, pad: usize) {
        for i in from..to {
            let mut cmd = put_vm(i);
            if let Command::PutVm { vm, .. } = &mut cmd {
                vm.spec.kernel_cmdline = "x".repeat(pad);
            }
            let resp = self.write(cmd).await;
            assert!(matches!(resp, Response::Vm(_)), "{resp:?}");
        }
    }

    pub async fn stop_all(&mut self) {
        for n in &mut self.nodes {
            n.stop().await;
        }
    }
}

/// Waits for a leader that every running node names; returns its index.
pub async fn wait_leader_among<F: TransportFactory>(nodes: &[TestNode<F>]) -> usize {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let running: Vec<(usize, &RaftNode)> = nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| n.raft.as_ref().map(|r| (i, r)))
            .collect();
        let leaders: Vec<Option<NodeId>> = running
            .iter()
            .map(|(_, r)| r.raft().metrics().borrow_watched().current_leader)
            .collect();
        if let Some(Some(leader)) = leaders.first()
            && leaders.iter().all(|l| *l == Some(*leader))
            && let Some((i, r)) = running.iter().find(|(_, r)| r.id() == *leader)
            && r.raft().metrics().borrow_watched().state == ServerState::Leader
        {
            return *i;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no agreed leader: {leaders:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One call with a 20 s deadline, for tests that speak to a node's
/// services directly.
pub async fn call(
    client: &dyn tern_protocol::RpcClient,
    peer: &tern_protocol::PeerAddr,
    method: &'static tern_protocol::Method,
    payload: bytes::Bytes,
) -> Result<bytes::Bytes, tern_protocol::CallError> {
    client
        .call(
            peer,
            tern_protocol::Call::new(method, payload)
                .with_timeout(std::time::Duration::from_secs(20)),
        )
        .await
}
