//! A cluster of real nodes in one process: each node has its own data
//! directory, its persistent key, a real transport on loopback (iroh or
//! gRPC, chosen by a [`TransportFactory`]) and a [`RaftNode`] on sled.
//! Shared by the integration tests and the benches.

#![allow(dead_code)] // reason: each test binary uses a different part
#![allow(unreachable_pub)] // reason: a module of test binaries, not a library

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use tern_cluster::{
    FIRST_NODE_ID, JoinToken, RaftNode, RaftOptions, RaftServices, read_node_id, write_node_id,
};
use tern_protocol::{Dispatcher, PeerAddr, RpcClient};
use tern_state::{Capacity, Command, Member, NodeId, Response, VmRecord, VmSpec, VmState};
use tern_transport_iroh::load_or_create_secret_key;

/// The join token every test cluster uses.
pub const TOKEN: &str = "correct horse battery staple";
/// Bound on every wait in the tests: generous, because the machine is
/// shared; never a statement about speed.
pub const WAIT: Duration = Duration::from_secs(60);
#[allow(unused_imports)]
// reason: each test binary uses a different part of the shared support.
pub use tern_test_transports::{DRAIN, Dual, DualTransport, Grpc, Iroh, TransportFactory};

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
