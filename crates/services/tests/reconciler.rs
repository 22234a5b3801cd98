//! The reconciler against the real `process` runtime: resuming after a
//! node restart, bounded start retries, waiting while not caught up, and
//! removing workloads placed on no node. Raft is the in-process test
//! `Consensus` (a real `ClusterState`; only replication is absent).
#![allow(clippy::unwrap_used)] // reason: tests fail loudly on unexpected errors.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use support::consensus::Shared;
use tern_protocol::{PeerAddr, PeerId};
use tern_runtime::pidfile::KillOnDrop;
use tern_runtime::{ProcessRuntime, RunState, Runtime, pidfile};
use tern_services::consensus::Consensus;
use tern_services::reconciler::{Reconciler, ReconcilerConfig};
use tern_state::{Capacity, Command, Response, VmSpec, VmState};

/// Upper bound on any one test.
const TEST_BOUND: Duration = Duration::from_secs(60);

fn config() -> ReconcilerConfig {
    ReconcilerConfig {
        interval: Duration::from_millis(50),
        stop_grace: Duration::from_secs(5),
        retry_backoff: Duration::ZERO,
        max_retry_backoff: Duration::ZERO,
        ..ReconcilerConfig::default()
    }
}

fn node(shared: &Arc<Shared>, dir: &Path) -> (Reconciler, Arc<dyn Runtime>) {
    let runtime: Arc<dyn Runtime> = Arc::new(ProcessRuntime::new(dir));
    let r = Reconciler::new(1, shared.view(1), vec![runtime.clone()], config());
    (r, runtime)
}

fn cluster() -> Arc<Shared> {
    let shared = Shared::new(1);
    let mut addr = PeerAddr::new(PeerId::from_bytes([7; 32]));
    addr.grpc = Some("https://127.0.0.1:9".into());
    shared.set_members(&[(
        1,
        addr,
        Capacity {
            vcpus: 8,
            memory_mib: 8192,
        },
    )]);
    shared
}

async fn create(shared: &Arc<Shared>, name: &str, command: &[&str]) -> String {
    let c: Arc<dyn Consensus> = shared.view(1);
    let r = c
        .write(Command::CreateVm {
            request_id: format!("create-{name}"),
            spec: Box::new(VmSpec {
                name: name.into(),
                vcpus: 1,
                memory_mib: 64,
                runtime: "process".into(),
                command: command.iter().map(|s| (*s).to_owned()).collect(),
                ..VmSpec::default()
            }),
        })
        .await
        .unwrap();
    match r {
        Response::Vm(vm) => vm.id,
        other => panic!("{other:?}"),
    }
}

async fn bounded<F: std::future::Future<Output = ()>>(test: F) {
    tokio::time::timeout(TEST_BOUND, test)
        .await
        .expect("test exceeded its bound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_adopts_its_running_vms() {
    let dir = tempfile::tempdir().unwrap();
    let _guard = KillOnDrop::new(dir.path());
    bounded(async {
        let shared = cluster();
        let id = create(&shared, "keep", &["sleep", "600"]).await;
        let (mut r, runtime) = node(&shared, dir.path());
        let pass = r.reconcile_once().await;
        assert_eq!((pass.vms, pass.reports, pass.errors), (1, 1, 0));
        let pid = runtime.status(&id).await.unwrap().pid.unwrap();
        assert_eq!(shared.state().vm(&id).unwrap().observed, VmState::Running);

        // The node process ends: the workload keeps running.
        drop(r);
        drop(runtime);
        let (mut r, runtime) = node(&shared, dir.path());
        r.recover().await;
        let pass = r.reconcile_once().await;
        assert_eq!((pass.reports, pass.errors), (0, 0), "nothing changed");
        let observed = runtime.status(&id).await.unwrap();
        assert_eq!(observed.state, RunState::Running);
        assert_eq!(observed.pid, Some(pid), "adopted, not started twice");
        assert_eq!(pidfile::live_workloads(dir.path()).len(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_that_keeps_failing_is_reported_failed_after_bounded_retries() {
    let dir = tempfile::tempdir().unwrap();
    let _guard = KillOnDrop::new(dir.path());
    bounded(async {
        let shared = cluster();
        let id = create(&shared, "broken", &["/nonexistent/tern-test-program"]).await;
        let (mut r, _runtime) = node(&shared, dir.path());
        let attempts = config().max_start_attempts;
        for _ in 1..attempts {
            let pass = r.reconcile_once().await;
            assert_eq!(pass.errors, 1);
            assert_eq!(shared.state().vm(&id).unwrap().observed, VmState::Pending);
        }
        r.reconcile_once().await;
        let vm = shared.state().vm(&id).unwrap().clone();
        assert_eq!(vm.observed, VmState::Failed);
        assert!(
            vm.reason
                .contains(&format!("start failed {attempts} times")),
            "{}",
            vm.reason
        );
        // A failed VM is left alone until an operator starts it again.
        let pass = r.reconcile_once().await;
        assert_eq!((pass.errors, pass.reports), (0, 0));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_done_while_no_leader_is_known() {
    let dir = tempfile::tempdir().unwrap();
    let _guard = KillOnDrop::new(dir.path());
    bounded(async {
        let shared = cluster();
        create(&shared, "later", &["sleep", "600"]).await;
        shared.set_leader(None);
        let (mut r, _runtime) = node(&shared, dir.path());
        let pass = r.reconcile_once().await;
        assert!(pass.waiting.unwrap().contains("no Raft leader"));
        assert!(pidfile::live_workloads(dir.path()).is_empty());
        shared.set_leader(Some(1));
        let pass = r.reconcile_once().await;
        assert_eq!((pass.waiting, pass.reports), (None, 1));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_placed_on_no_node_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let _guard = KillOnDrop::new(dir.path());
    bounded(async {
        let shared = cluster();
        let (mut r, runtime) = node(&shared, dir.path());
        let spec = tern_protocol::pb::VmSpec {
            name: "stray".into(),
            vcpus: 1,
            memory_mib: 64,
            runtime: "process".into(),
            command: vec!["sleep".into(), "600".into()],
            ..Default::default()
        };
        runtime.start("vm-stray", &spec).await.unwrap();
        assert_eq!(pidfile::live_workloads(dir.path()).len(), 1);
        r.reconcile_once().await;
        assert!(pidfile::live_workloads(dir.path()).is_empty());
        assert!(runtime.list().await.is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_background_loop_follows_the_state_and_stops_on_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let _guard = KillOnDrop::new(dir.path());
    bounded(async {
        let shared = cluster();
        let (r, _runtime) = node(&shared, dir.path());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(r.run(async move {
            let _ = stopped.await;
        }));
        let id = create(&shared, "looped", &["sleep", "600"]).await;
        let mut status = shared.view(1).status();
        loop {
            if shared.state().vm(&id).unwrap().observed == VmState::Running {
                break;
            }
            status.changed().await.unwrap();
        }
        drop(stop);
        task.await.unwrap();
    })
    .await;
}
