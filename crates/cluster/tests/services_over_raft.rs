//! The services over a real single-node Raft (openraft on sled, started by
//! `tern_cluster::RaftNode`), served over each transport: Status and
//! Health report the real Raft, and a VM is created, retried, run by the
//! reconciler on the real `process` runtime, stopped and deleted, every
//! change a committed Raft entry.
#![allow(clippy::unwrap_used)] // reason: tests fail loudly on unexpected errors.

#[path = "services_support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use support::raft::SingleNode;
use support::wait_for;
use tern_protocol::catalog::methods;
use tern_protocol::rpc::call_typed;
use tern_protocol::{CallError, Code, Dispatcher, PeerAddr, ServiceId, pb};
use tern_runtime::pidfile::KillOnDrop;
use tern_runtime::{ProcessRuntime, Runtime, RuntimeKind, pidfile};
use tern_services::consensus::Consensus;
use tern_services::health::HealthService;
use tern_services::node_info::StaticNodeInfo;
use tern_services::reconciler::{Reconciler, ReconcilerConfig};
use tern_services::status::StatusService;
use tern_services::vm::VmService;
use tern_state::Capacity;
use tern_test_transports::{Kind, Node};

/// Upper bound on the test.
const TEST_BOUND: Duration = Duration::from_secs(120);
/// Bound on waiting for a VM to reach a state.
const WAIT: Duration = Duration::from_secs(30);
/// Per-call timeout.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

async fn services_over_real_raft(kind: Kind) {
    let dir = tempfile::tempdir().unwrap();
    let runtime_dir = dir.path().join("runtime");
    let _guard = KillOnDrop::new(&runtime_dir);
    let client = Node::start(kind, Arc::new(Dispatcher::new())).await;
    let placeholder: PeerAddr = client.addr();
    let raft = SingleNode::start(
        &dir.path().join("raft"),
        placeholder,
        Capacity {
            vcpus: 4,
            memory_mib: 4096,
        },
        client.client(),
    )
    .await;
    let consensus = raft.consensus.clone();
    let c: Arc<dyn Consensus> = consensus.clone();
    let info = Arc::new(StaticNodeInfo {
        address: pb::PeerAddress::default(),
        policy: pb::TransportPolicy {
            mode: "grpc".into(),
            ..Default::default()
        },
        policy_source: "file".into(),
        transports: vec![],
        version: "test".into(),
        started: Instant::now(),
    });
    let dispatcher = Dispatcher::new()
        .register(
            ServiceId::Health,
            HealthService::new(c.clone(), info.clone()).handler(),
        )
        .register(
            ServiceId::Status,
            StatusService::new(c.clone(), info).handler(),
        )
        .register(
            ServiceId::Vm,
            VmService::new(c.clone(), RuntimeKind::Process).handler(),
        );
    let server = Node::start(kind, Arc::new(dispatcher)).await;
    let rt: Arc<dyn Runtime> = Arc::new(ProcessRuntime::new(&runtime_dir));
    let config = ReconcilerConfig {
        interval: Duration::from_millis(100),
        stop_grace: Duration::from_secs(5),
        ..ReconcilerConfig::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(
        Reconciler::new(1, c.clone(), vec![rt], config).run(async move {
            let _ = stopped.await;
        }),
    );

    let status: pb::NodeStatus = call_typed(
        &*client.client(),
        &server.addr(),
        methods::STATUS_GET,
        &pb::StatusRequest {},
        CALL_TIMEOUT,
    )
    .await
    .unwrap();
    assert_eq!((status.node_id, status.leader_id), (1, 1));
    assert_eq!(status.role, pb::RaftRole::Leader as i32);
    assert!(status.term >= 1);
    assert_eq!(status.members.len(), 1);
    assert!(status.members[0].voter);
    let health: pb::HealthCheckResponse = call_typed(
        &*client.client(),
        &server.addr(),
        methods::HEALTH_CHECK,
        &pb::HealthCheckRequest {},
        CALL_TIMEOUT,
    )
    .await
    .unwrap();
    assert_eq!(
        health.readiness,
        pb::ServingState::Serving as i32,
        "{}",
        health.detail
    );

    let vm_call = |method, req: Vec<u8>| {
        let c = client.client();
        let addr = server.addr();
        async move {
            let bytes = c
                .call(
                    &addr,
                    tern_protocol::Call::new(method, req.into()).with_timeout(CALL_TIMEOUT),
                )
                .await?;
            Ok::<pb::VmRecord, CallError>(prost::Message::decode(bytes).unwrap())
        }
    };
    let create = prost::Message::encode_to_vec(&pb::CreateVmRequest {
        request_id: "raft-create-1".into(),
        spec: Some(pb::VmSpec {
            name: "on-raft".into(),
            vcpus: 1,
            memory_mib: 64,
            command: vec!["sleep".into(), "600".into()],
            // Empty runtime: the service records its default (process).
            ..Default::default()
        }),
    });
    let vm = vm_call(methods::VM_CREATE, create.clone()).await.unwrap();
    assert_eq!(vm.spec.as_ref().unwrap().runtime, "process");
    assert_eq!(
        vm_call(methods::VM_CREATE, create).await.unwrap(),
        vm,
        "a retry is the same VM"
    );

    let get = prost::Message::encode_to_vec(&pb::GetVmRequest {
        vm_id: vm.id.clone(),
    });
    let wait_observed = |want: pb::VmState| {
        let get = get.clone();
        let vm_call = &vm_call;
        async move {
            wait_for(WAIT, &format!("observed {want:?}"), || {
                let get = get.clone();
                async move {
                    let r = vm_call(methods::VM_GET, get).await.ok()?;
                    (r.observed == want as i32).then_some(r)
                }
            })
            .await
        }
    };
    let running = wait_observed(pb::VmState::Running).await;
    // The reconciler's report went through Raft: a committed write of the
    // record (its generation moved on), read back from the state machine.
    // (Not from openraft's metrics watch: it can trail the state machine's
    // last apply until the next Raft event.)
    assert!(running.generation > vm.generation, "{running:?}");
    let applied = c.query(|s| s.vm(&vm.id).map(|v| v.generation)).unwrap();
    assert_eq!(applied, Some(running.generation));
    assert_eq!(pidfile::live_workloads(&runtime_dir).len(), 1);

    let action = |req: &str| {
        prost::Message::encode_to_vec(&pb::VmActionRequest {
            request_id: req.into(),
            vm_id: vm.id.clone(),
        })
    };
    vm_call(methods::VM_STOP, action("raft-stop-1"))
        .await
        .unwrap();
    wait_observed(pb::VmState::Stopped).await;
    assert!(pidfile::live_workloads(&runtime_dir).is_empty());
    vm_call(methods::VM_DELETE, action("raft-delete-1"))
        .await
        .unwrap();
    wait_for(WAIT, "the record to go", || async {
        match vm_call(methods::VM_GET, get.clone()).await {
            Err(CallError::Application(s)) if s.code == Code::NotFound => Some(()),
            _ => None,
        }
    })
    .await;

    drop(stop);
    tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
    server.shutdown().await;
    client.shutdown().await;
    drop(c);
    drop(consensus);
    raft.shutdown().await;
}

async fn bounded<F: std::future::Future<Output = ()>>(test: F) {
    tokio::time::timeout(TEST_BOUND, test)
        .await
        .expect("test exceeded its bound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_grpc() {
    bounded(services_over_real_raft(Kind::Grpc)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_iroh() {
    bounded(services_over_real_raft(Kind::Iroh)).await
}
