//! Health, Status and VM served over real transports: every test body runs
//! twice, over gRPC and over iroh, with a client node calling a server
//! node on loopback.
//!
//! Raft is the in-process test [`Consensus`] of `support::consensus` (a
//! real `ClusterState` and its real `apply`; only replication is absent).
//! Reconcilers drive a real [`ProcessRuntime`]; the tests that need an
//! exact sequence call [`Reconciler::reconcile_once`] themselves instead
//! of waiting on a background loop.
#![allow(clippy::unwrap_used)] // reason: tests fail loudly on unexpected errors.

mod support;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use support::consensus::{Shared, TestConsensus};
use support::wait_for;
use tern_protocol::catalog::methods;
use tern_protocol::rpc::call_typed;
use tern_protocol::{Call, CallError, Code, Dispatcher, Method, PeerAddr, PeerId, ServiceId, pb};
use tern_runtime::pidfile::KillOnDrop;
use tern_runtime::{ProcessRuntime, Runtime, RuntimeKind, pidfile};
use tern_services::consensus::Consensus;
use tern_services::health::HealthService;
use tern_services::node_info::NodeInfo;
use tern_services::reconciler::{Reconciler, ReconcilerConfig};
use tern_services::status::StatusService;
use tern_services::vm::VmService;
use tern_state::{Capacity, NodeId};
use tern_test_transports::{Kind, Node};

/// Upper bound on any one test.
const TEST_BOUND: Duration = Duration::from_secs(120);
/// Bound on waiting for a VM to reach a state.
const WAIT: Duration = Duration::from_secs(30);
/// Per-call timeout.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// The node facts a test node reports.
struct Info {
    addr: OnceLock<PeerAddr>,
    started: Instant,
}

impl NodeInfo for Info {
    fn address(&self) -> pb::PeerAddress {
        self.addr
            .get()
            .map(pb::PeerAddress::from)
            .unwrap_or_default()
    }
    fn policy(&self) -> pb::TransportPolicy {
        pb::TransportPolicy {
            mode: "dual".into(),
            prefer_iroh: vec!["health".into(), "status".into()],
            raft_transport: "grpc".into(),
            fallback_to_grpc: true,
        }
    }
    fn policy_source(&self) -> String {
        "file".into()
    }
    fn transports(&self) -> Vec<pb::TransportHealth> {
        vec![
            pb::TransportHealth {
                transport: pb::Transport::Grpc as i32,
                state: pb::ServingState::Serving as i32,
                detail: String::new(),
            },
            pb::TransportHealth {
                transport: pb::Transport::Iroh as i32,
                state: pb::ServingState::NotServing as i32,
                detail: "relay unreachable".into(),
            },
        ]
    }
    fn version(&self) -> String {
        "0.1.0-test".into()
    }
    fn started(&self) -> Instant {
        self.started
    }
}

fn cap(vcpus: u32, memory_mib: u64) -> Capacity {
    Capacity { vcpus, memory_mib }
}

/// A node serving Health, Status and VM over `consensus`.
async fn serve(kind: Kind, consensus: Arc<TestConsensus>, forward: bool) -> (Node, Arc<Info>) {
    let info = Arc::new(Info {
        addr: OnceLock::new(),
        started: Instant::now(),
    });
    let c: Arc<dyn Consensus> = consensus;
    let vm = VmService::new(c.clone(), RuntimeKind::Process);
    let dispatcher = Dispatcher::new()
        .register(
            ServiceId::Health,
            HealthService::new(c.clone(), info.clone()).handler(),
        )
        .register(
            ServiceId::Status,
            StatusService::new(c.clone(), info.clone()).handler(),
        )
        .register(ServiceId::Vm, vm.handler());
    let node = Node::start(kind, Arc::new(dispatcher)).await;
    if forward {
        // As a node does: its own client, built with the transport.
        assert!(vm.set_forward(node.client()));
    }
    info.addr.set(node.addr()).unwrap();
    (node, info)
}

/// One serving node (node 1, the leader, 8 vCPUs and 8 GiB) and a client
/// node that is not a member.
struct Fixture {
    shared: Arc<Shared>,
    server: Node,
    client: Node,
    dir: tempfile::TempDir,
    _guard: KillOnDrop,
}

impl Fixture {
    async fn new(kind: Kind) -> Fixture {
        let shared = Shared::new(1);
        let (server, _) = serve(kind, shared.view(1), false).await;
        shared.set_members(&[(1, server.addr(), cap(8, 8192))]);
        let client = Node::start(kind, Arc::new(Dispatcher::new())).await;
        let dir = tempfile::tempdir().unwrap();
        let guard = KillOnDrop::new(dir.path());
        Fixture {
            shared,
            server,
            client,
            dir,
            _guard: guard,
        }
    }

    async fn call<Req: prost::Message, Resp: prost::Message + Default>(
        &self,
        method: &'static Method,
        req: &Req,
    ) -> Result<Resp, CallError> {
        call_typed(
            &*self.client.client(),
            &self.server.addr(),
            method,
            req,
            CALL_TIMEOUT,
        )
        .await
    }

    /// A reconciler for `node` over its own runtime directory.
    fn reconciler(&self, node: NodeId) -> Reconciler {
        reconciler(
            &self.shared,
            node,
            &self.dir.path().join(format!("node-{node}")),
        )
    }

    async fn shutdown(self) {
        self.client.shutdown().await;
        self.server.shutdown().await;
    }
}

fn reconciler(shared: &Arc<Shared>, node: NodeId, dir: &std::path::Path) -> Reconciler {
    let runtime: Arc<dyn Runtime> = Arc::new(ProcessRuntime::new(dir));
    Reconciler::new(
        node,
        shared.forwarding_view(node),
        vec![runtime],
        fast_config(),
    )
}

/// Short intervals and backoffs: the tests wait on outcomes, never on time.
fn fast_config() -> ReconcilerConfig {
    ReconcilerConfig {
        interval: Duration::from_millis(50),
        stop_grace: Duration::from_secs(5),
        retry_backoff: Duration::ZERO,
        max_retry_backoff: Duration::ZERO,
        ..ReconcilerConfig::default()
    }
}

fn process_spec(name: &str) -> pb::VmSpec {
    pb::VmSpec {
        name: name.into(),
        vcpus: 1,
        memory_mib: 64,
        runtime: "process".into(),
        command: vec![
            "/bin/sh".into(),
            "-c".into(),
            "echo hello from the vm; exec sleep 600".into(),
        ],
        ..pb::VmSpec::default()
    }
}

fn create(req: &str, spec: pb::VmSpec) -> pb::CreateVmRequest {
    pb::CreateVmRequest {
        request_id: req.into(),
        spec: Some(spec),
    }
}

fn action(req: &str, vm: &str) -> pb::VmActionRequest {
    pb::VmActionRequest {
        request_id: req.into(),
        vm_id: vm.into(),
    }
}

fn get(vm: &str) -> pb::GetVmRequest {
    pb::GetVmRequest { vm_id: vm.into() }
}

fn state(s: pb::VmState) -> i32 {
    s as i32
}

/// The application status of a failed call.
fn status_of<T: std::fmt::Debug>(r: Result<T, CallError>) -> tern_protocol::Status {
    match r {
        Err(CallError::Application(s)) => s,
        other => panic!("expected an application error, got {other:?}"),
    }
}

/// An undecodable request is answered with an error and the node goes on
/// serving. Over iroh the payload reaches the service, which answers
/// `InvalidArgument`; the gRPC transport decodes typed messages itself and
/// answers before the service is called.
async fn garbage_is_refused(f: &Fixture, kind: Kind, method: &'static Method) {
    let raw = f
        .client
        .client()
        .call(
            &f.server.addr(),
            Call::new(method, Bytes::from_static(&[0x0a, 0xff, 0xff])),
        )
        .await;
    let s = status_of(raw);
    if kind == Kind::Iroh {
        assert_eq!(s.code, Code::InvalidArgument, "{s}");
    }
    let _: pb::HealthCheckResponse = f
        .call(methods::HEALTH_CHECK, &pb::HealthCheckRequest {})
        .await
        .unwrap();
}

async fn bounded<F: std::future::Future<Output = ()>>(test: F) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    tokio::time::timeout(TEST_BOUND, test)
        .await
        .expect("test exceeded its bound");
}

macro_rules! over_both_transports {
    ($($name:ident),* $(,)?) => { $(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn grpc() {
                super::bounded(super::$name(super::Kind::Grpc)).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn iroh() {
                super::bounded(super::$name(super::Kind::Iroh)).await
            }
        }
    )* };
}

over_both_transports!(
    health_and_status,
    vm_lifecycle,
    vm_bad_input,
    stop_of_a_vm_on_a_node_that_is_down,
    migration_moves_a_vm_and_survives_a_source_crash,
    follower_forwards_writes_to_the_leader,
);

async fn health_and_status(kind: Kind) {
    let f = Fixture::new(kind).await;
    let h: pb::HealthCheckResponse = f
        .call(methods::HEALTH_CHECK, &pb::HealthCheckRequest {})
        .await
        .unwrap();
    assert_eq!(h.liveness, pb::ServingState::Serving as i32);
    assert_eq!(
        h.readiness,
        pb::ServingState::Serving as i32,
        "{}",
        h.detail
    );
    assert_eq!(h.transports.len(), 2);
    assert_eq!(h.transports[1].detail, "relay unreachable");

    // No leader: alive but not ready, and the reason says why.
    f.shared.set_leader(None);
    let h: pb::HealthCheckResponse = f
        .call(methods::HEALTH_CHECK, &pb::HealthCheckRequest {})
        .await
        .unwrap();
    assert_eq!(h.liveness, pb::ServingState::Serving as i32);
    assert_eq!(h.readiness, pb::ServingState::NotServing as i32);
    assert!(h.detail.contains("no Raft leader"), "{}", h.detail);

    // The feed the node copies into grpc.health.v1 follows.
    let info = Arc::new(Info {
        addr: OnceLock::new(),
        started: Instant::now(),
    });
    let health = HealthService::new(f.shared.view(1), info);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut feed = health.publish(async move {
        let _ = stop_rx.await;
    });
    assert!(!feed.borrow().ready);
    f.shared.set_leader(Some(1));
    let report = feed.wait_for(|r| r.ready).await.unwrap().clone();
    assert_eq!(
        report.transports,
        vec![
            (tern_protocol::TransportKind::Grpc, true),
            (tern_protocol::TransportKind::Iroh, false)
        ]
    );
    drop(stop_tx);

    let s: pb::NodeStatus = f
        .call(methods::STATUS_GET, &pb::StatusRequest {})
        .await
        .unwrap();
    assert_eq!(s.node_id, 1);
    assert_eq!(s.role, pb::RaftRole::Leader as i32);
    assert_eq!(s.leader_id, 1);
    assert_eq!(s.term, 1);
    assert_eq!(s.members.len(), 1);
    assert!(s.members[0].voter);
    assert_eq!(s.members[0].capacity.unwrap().vcpus, 8);
    assert!(s.applied_index > 0);
    assert_eq!(s.applied_index, s.commit_index);
    assert_eq!(s.policy.unwrap().raft_transport, "grpc");
    assert_eq!(s.version, "0.1.0-test");
    assert_eq!(
        s.address.unwrap().endpoint_id.as_ref(),
        f.server.id().as_bytes()
    );

    // Garbage is refused, not a panic.
    garbage_is_refused(&f, kind, methods::STATUS_GET).await;

    // Raft stopped on a storage failure: not live, not ready, and the
    // detail says what failed (the node exits on it).
    f.shared
        .fail_raft("Raft log append in \"/data/raft-log\" failed: EIO");
    let h: pb::HealthCheckResponse = f
        .call(methods::HEALTH_CHECK, &pb::HealthCheckRequest {})
        .await
        .unwrap();
    assert_eq!(h.liveness, pb::ServingState::NotServing as i32);
    assert_eq!(h.readiness, pb::ServingState::NotServing as i32);
    assert!(h.detail.contains("raft-log"), "{}", h.detail);
    assert!(h.detail.contains("exiting"), "{}", h.detail);
    f.shutdown().await;
}

async fn vm_lifecycle(kind: Kind) {
    let f = Fixture::new(kind).await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(f.reconciler(1).run(async move {
        let _ = stop_rx.await;
    }));

    let vm: pb::VmRecord = f
        .call(methods::VM_CREATE, &create("create-1", process_spec("web")))
        .await
        .unwrap();
    assert_eq!((vm.node_id, vm.desired), (1, state(pb::VmState::Running)));
    // A retried create (same request id) answers the same VM.
    let again: pb::VmRecord = f
        .call(methods::VM_CREATE, &create("create-1", process_spec("web")))
        .await
        .unwrap();
    assert_eq!(again, vm);
    let list: pb::ListVmsResponse = f
        .call(methods::VM_LIST, &pb::ListVmsRequest { node_id: 0 })
        .await
        .unwrap();
    assert_eq!(list.vms.len(), 1);

    let wait_state = |want: pb::VmState| {
        let id = vm.id.clone();
        let f = &f;
        async move {
            wait_for(WAIT, &format!("{id} observed {want:?}"), || {
                let id = id.clone();
                async move {
                    let r: pb::VmRecord = f.call(methods::VM_GET, &get(&id)).await.ok()?;
                    (r.observed == want as i32).then_some(r)
                }
            })
            .await
        }
    };
    let running = wait_state(pb::VmState::Running).await;
    assert!(running.log_path.ends_with("workload.log"), "{running:?}");
    wait_for(WAIT, "the workload's output", || {
        let path = running.log_path.clone();
        async move {
            let text = tokio::fs::read_to_string(path).await.ok()?;
            text.contains("hello from the vm").then_some(())
        }
    })
    .await;

    let stopping: pb::VmRecord = f
        .call(methods::VM_STOP, &action("stop-1", &vm.id))
        .await
        .unwrap();
    assert_eq!(stopping.desired, state(pb::VmState::Stopped));
    wait_state(pb::VmState::Stopped).await;
    // The stop's retry is answered from the deduplication table.
    let retried: pb::VmRecord = f
        .call(methods::VM_STOP, &action("stop-1", &vm.id))
        .await
        .unwrap();
    assert_eq!(retried, stopping);

    f.call::<_, pb::VmRecord>(methods::VM_START, &action("start-1", &vm.id))
        .await
        .unwrap();
    wait_state(pb::VmState::Running).await;

    let deleting: pb::VmRecord = f
        .call(methods::VM_DELETE, &action("delete-1", &vm.id))
        .await
        .unwrap();
    assert_eq!(deleting.desired, state(pb::VmState::Deleted));
    wait_for(WAIT, "the record to go", || async {
        let r: Result<pb::VmRecord, _> = f.call(methods::VM_GET, &get(&vm.id)).await;
        matches!(r, Err(CallError::Application(ref s)) if s.code == Code::NotFound).then_some(())
    })
    .await;
    assert!(pidfile::live_workloads(&f.dir.path().join("node-1")).is_empty());

    drop(stop_tx);
    tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
    f.shutdown().await;
}

async fn vm_bad_input(kind: Kind) {
    let f = Fixture::new(kind).await;
    let refused = |r: Result<pb::VmRecord, CallError>, code: Code, needle: &str| {
        let s = status_of(r);
        assert_eq!(s.code, code, "{s}");
        assert!(s.message.contains(needle), "{needle:?} not in {s}");
    };
    let bad = pb::VmSpec {
        vcpus: 0,
        ..process_spec("web")
    };
    refused(
        f.call(methods::VM_CREATE, &create("a", bad)).await,
        Code::InvalidArgument,
        "`vcpus`",
    );
    let bad = pb::VmSpec {
        name: "Bad_Name".into(),
        ..process_spec("web")
    };
    refused(
        f.call(methods::VM_CREATE, &create("b", bad)).await,
        Code::InvalidArgument,
        "`name`",
    );
    let bad = pb::VmSpec {
        runtime: "docker".into(),
        ..process_spec("web")
    };
    refused(
        f.call(methods::VM_CREATE, &create("c", bad)).await,
        Code::InvalidArgument,
        "`runtime`",
    );
    let bad = pb::VmSpec {
        command: vec![],
        ..process_spec("web")
    };
    refused(
        f.call(methods::VM_CREATE, &create("d", bad)).await,
        Code::InvalidArgument,
        "`command`",
    );
    refused(
        f.call(
            methods::VM_CREATE,
            &pb::CreateVmRequest {
                request_id: "e".into(),
                spec: None,
            },
        )
        .await,
        Code::InvalidArgument,
        "`spec`",
    );
    refused(
        f.call(methods::VM_CREATE, &create("", process_spec("web")))
            .await,
        Code::InvalidArgument,
        "`request_id`",
    );
    let pinned = pb::VmSpec {
        pin_node: 9,
        ..process_spec("web")
    };
    refused(
        f.call(methods::VM_CREATE, &create("f", pinned)).await,
        Code::InvalidArgument,
        "node 9 is not a member",
    );
    let huge = pb::VmSpec {
        vcpus: 16,
        ..process_spec("web")
    };
    refused(
        f.call(methods::VM_CREATE, &create("g", huge)).await,
        Code::ResourceExhausted,
        "16 free vCPUs",
    );
    // Over the write limits: one field (named, with its limit), or the
    // request as a whole; neither is proposed.
    let long_arg = pb::VmSpec {
        command: vec![
            "sleep".into(),
            "x".repeat(tern_state::limits::MAX_COMMAND_ARG_LEN + 1),
        ],
        ..process_spec("web")
    };
    refused(
        f.call(methods::VM_CREATE, &create("o", long_arg)).await,
        Code::InvalidArgument,
        &format!(
            "`spec.command[1]` is {} bytes; at most {}",
            tern_state::limits::MAX_COMMAND_ARG_LEN + 1,
            tern_state::limits::MAX_COMMAND_ARG_LEN
        ),
    );
    let long_cmdline = pb::VmSpec {
        kernel_cmdline: "c".repeat(tern_state::limits::MAX_KERNEL_CMDLINE_LEN + 1),
        ..process_spec("web")
    };
    refused(
        f.call(methods::VM_CREATE, &create("p", long_cmdline)).await,
        Code::InvalidArgument,
        "`spec.kernel_cmdline`",
    );
    let whole = pb::VmSpec {
        command: vec![
            "a".repeat(tern_state::limits::MAX_COMMAND_ARG_LEN);
            tern_state::limits::MAX_REQUEST_BYTES
                / tern_state::limits::MAX_COMMAND_ARG_LEN
                + 1
        ],
        ..process_spec("web")
    };
    refused(
        f.call(methods::VM_CREATE, &create("q", whole)).await,
        Code::ResourceExhausted,
        &tern_state::limits::MAX_REQUEST_BYTES.to_string(),
    );
    // Nothing was written by any of those.
    assert!(f.shared.state().vms().is_empty());

    // Unknown VMs.
    refused(
        f.call(methods::VM_GET, &get("vm-404")).await,
        Code::NotFound,
        "vm-404",
    );
    refused(
        f.call(methods::VM_STOP, &action("h", "vm-404")).await,
        Code::NotFound,
        "vm-404",
    );
    refused(
        f.call(methods::VM_START, &action("i", "vm-404")).await,
        Code::NotFound,
        "vm-404",
    );
    refused(
        f.call(methods::VM_DELETE, &action("j", "vm-404")).await,
        Code::NotFound,
        "vm-404",
    );
    let migrate = |req: &str, vm: &str, target| pb::MigrateVmRequest {
        request_id: req.into(),
        vm_id: vm.into(),
        target_node: target,
    };
    refused(
        f.call(methods::VM_MIGRATE, &migrate("k", "vm-404", 1))
            .await,
        Code::NotFound,
        "vm-404",
    );
    refused(
        f.call(methods::VM_STOP, &action("l", "../etc")).await,
        Code::InvalidArgument,
        "`vm_id`",
    );

    // A duplicate request id answers the first write, whatever it carries.
    let first: pb::VmRecord = f
        .call(methods::VM_CREATE, &create("dup", process_spec("first")))
        .await
        .unwrap();
    let dup: pb::VmRecord = f
        .call(methods::VM_CREATE, &create("dup", process_spec("second")))
        .await
        .unwrap();
    assert_eq!(dup, first);
    assert_eq!(f.shared.state().vms().len(), 1);
    // The same name under a new request id is taken.
    refused(
        f.call(methods::VM_CREATE, &create("dup-2", process_spec("first")))
            .await,
        Code::AlreadyExists,
        "first",
    );
    refused(
        f.call(methods::VM_MIGRATE, &migrate("m", &first.id, 0))
            .await,
        Code::InvalidArgument,
        "`target_node`",
    );
    refused(
        f.call(methods::VM_MIGRATE, &migrate("n", &first.id, 1))
            .await,
        Code::FailedPrecondition,
        "already on node 1",
    );
    garbage_is_refused(&f, kind, methods::VM_CREATE).await;
    f.shutdown().await;
}

async fn stop_of_a_vm_on_a_node_that_is_down(kind: Kind) {
    let f = Fixture::new(kind).await;
    // Node 2 is a member whose process is down: nothing listens there.
    let mut down = PeerAddr::new(PeerId::from_bytes([0xd0; 32]));
    down.grpc = Some("https://127.0.0.1:9".into());
    f.shared
        .set_members(&[(1, f.server.addr(), cap(8, 8192)), (2, down, cap(8, 8192))]);
    let pinned = pb::VmSpec {
        pin_node: 2,
        ..process_spec("far")
    };
    let vm: pb::VmRecord = f
        .call(methods::VM_CREATE, &create("c", pinned))
        .await
        .unwrap();
    assert_eq!((vm.node_id, vm.observed), (2, state(pb::VmState::Pending)));

    // The stop is recorded: it is the desired state, and node 1's
    // reconciler leaves a VM placed elsewhere alone.
    let stopped: pb::VmRecord = f
        .call(methods::VM_STOP, &action("s", &vm.id))
        .await
        .unwrap();
    assert_eq!(stopped.desired, state(pb::VmState::Stopped));
    let mut node1 = f.reconciler(1);
    let pass = node1.reconcile_once().await;
    assert_eq!((pass.vms, pass.reports), (0, 0));
    let now: pb::VmRecord = f.call(methods::VM_GET, &get(&vm.id)).await.unwrap();
    assert_eq!(
        now.observed,
        state(pb::VmState::Pending),
        "no node acted on it"
    );

    // Node 2 comes back: its reconciler carries the stop out (the VM never
    // starts) and reports it.
    let mut node2 = f.reconciler(2);
    node2.recover().await;
    let pass = node2.reconcile_once().await;
    assert_eq!((pass.vms, pass.reports, pass.errors), (1, 1, 0));
    let now: pb::VmRecord = f.call(methods::VM_GET, &get(&vm.id)).await.unwrap();
    assert_eq!(now.observed, state(pb::VmState::Stopped));
    assert!(pidfile::live_workloads(&f.dir.path().join("node-2")).is_empty());
    f.shutdown().await;
}

async fn migration_moves_a_vm_and_survives_a_source_crash(kind: Kind) {
    let f = Fixture::new(kind).await;
    let mut peer2 = PeerAddr::new(PeerId::from_bytes([0xd2; 32]));
    peer2.grpc = Some("https://127.0.0.1:9".into());
    f.shared
        .set_members(&[(1, f.server.addr(), cap(8, 8192)), (2, peer2, cap(8, 8192))]);
    let dir1 = f.dir.path().join("node-1");
    let dir2 = f.dir.path().join("node-2");
    let (mut node1, mut node2) = (f.reconciler(1), f.reconciler(2));

    let pinned = pb::VmSpec {
        pin_node: 1,
        ..process_spec("mover")
    };
    let vm: pb::VmRecord = f
        .call(methods::VM_CREATE, &create("c", pinned))
        .await
        .unwrap();
    node1.reconcile_once().await;
    let running: pb::VmRecord = f.call(methods::VM_GET, &get(&vm.id)).await.unwrap();
    assert_eq!(
        (running.node_id, running.observed),
        (1, state(pb::VmState::Running))
    );
    assert_eq!(pidfile::live_workloads(&dir1).len(), 1);

    let migrate = |req: &str, target| pb::MigrateVmRequest {
        request_id: req.into(),
        vm_id: vm.id.clone(),
        target_node: target,
    };
    let moving: pb::VmRecord = f
        .call(methods::VM_MIGRATE, &migrate("m1", 2))
        .await
        .unwrap();
    assert_eq!(moving.desired, state(pb::VmState::Migrating));
    assert!(moving.reason.contains("to node 2"), "{}", moving.reason);
    // The target does nothing before the hand-over.
    node2.reconcile_once().await;
    assert!(pidfile::live_workloads(&dir2).is_empty());

    // The source crashes before stopping it: its workload outlives it.
    drop(node1);
    assert_eq!(pidfile::live_workloads(&dir1).len(), 1);
    // The restarted source adopts the workload, stops it and reports: the
    // record moves to the target.
    let mut node1 = f.reconciler(1);
    node1.recover().await;
    node1.reconcile_once().await;
    assert!(pidfile::live_workloads(&dir1).is_empty());
    let handed: pb::VmRecord = f.call(methods::VM_GET, &get(&vm.id)).await.unwrap();
    assert_eq!(
        (handed.node_id, handed.desired, handed.observed),
        (2, state(pb::VmState::Running), state(pb::VmState::Pending))
    );
    // Now the target starts it; it never ran on both.
    node2.reconcile_once().await;
    assert_eq!(pidfile::live_workloads(&dir2).len(), 1);
    assert!(pidfile::live_workloads(&dir1).is_empty());
    let moved: pb::VmRecord = f.call(methods::VM_GET, &get(&vm.id)).await.unwrap();
    assert_eq!(
        (moved.node_id, moved.observed),
        (2, state(pb::VmState::Running))
    );
    // The source forgets the stopped copy.
    node1.reconcile_once().await;
    assert!(!dir1.join(&vm.id).exists());

    // Rollback: a migration back is cancelled before the hand-over, and the
    // VM keeps running where it is.
    let pid = pidfile::live_workloads(&dir2)[0].1.pid;
    f.call::<_, pb::VmRecord>(methods::VM_MIGRATE, &migrate("m2", 1))
        .await
        .unwrap();
    let cancelled: pb::VmRecord = f
        .call(methods::VM_MIGRATE, &migrate("m3", 2))
        .await
        .unwrap();
    assert_eq!(
        (cancelled.node_id, cancelled.desired),
        (2, state(pb::VmState::Running))
    );
    node2.reconcile_once().await;
    assert_eq!(pidfile::live_workloads(&dir2)[0].1.pid, pid);
    f.shutdown().await;
}

async fn follower_forwards_writes_to_the_leader(kind: Kind) {
    let shared = Shared::new(2);
    let (leader, _) = serve(kind, shared.view(2), false).await;
    let (follower, _) = serve(kind, shared.view(1), true).await;
    let (plain, _) = serve(kind, shared.view(3), false).await;
    shared.set_members(&[
        (1, follower.addr(), cap(8, 8192)),
        (2, leader.addr(), cap(8, 8192)),
        (3, plain.addr(), cap(8, 8192)),
    ]);
    let client = Node::start(kind, Arc::new(Dispatcher::new())).await;
    let call = |to: &Node, req: &pb::CreateVmRequest| {
        let addr = to.addr();
        let c = client.client();
        let req = req.clone();
        async move {
            call_typed::<_, pb::VmRecord>(&*c, &addr, methods::VM_CREATE, &req, CALL_TIMEOUT).await
        }
    };
    // A client calling a follower is served by the leader, through it.
    let req = create("fwd-1", process_spec("fwd"));
    let vm = call(&follower, &req).await.unwrap();
    assert_eq!(shared.state().vms().len(), 1);
    // Its retry, through the follower or at the leader, is the same VM.
    assert_eq!(call(&follower, &req).await.unwrap(), vm);
    assert_eq!(call(&leader, &req).await.unwrap(), vm);
    // A follower that does not forward names the leader.
    let s = status_of(call(&plain, &create("fwd-2", process_spec("other"))).await);
    assert_eq!(s.code, Code::FailedPrecondition);
    assert!(s.message.contains("leader is node 2"), "{s}");
    // A call from a member is not forwarded again.
    let from_member = call_typed::<_, pb::VmRecord>(
        &*leader.client(),
        &follower.addr(),
        methods::VM_CREATE,
        &create("fwd-3", process_spec("other")),
        CALL_TIMEOUT,
    )
    .await;
    let s = status_of(from_member);
    assert_eq!(s.code, Code::FailedPrecondition);
    assert!(s.message.contains("not forwarded again"), "{s}");
    // Reads are served by the follower itself.
    let got: pb::VmRecord = call_typed(
        &*client.client(),
        &follower.addr(),
        methods::VM_GET,
        &get(&vm.id),
        CALL_TIMEOUT,
    )
    .await
    .unwrap();
    assert_eq!(got.id, vm.id);
    for node in [client, plain, follower, leader] {
        node.shutdown().await;
    }
}
