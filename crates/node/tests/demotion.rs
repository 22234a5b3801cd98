//! Demoting a server to an agent with real `tern` processes on loopback:
//! four servers, a VM pinned to the one to be demoted (a process
//! workload).
//!
//! - **The leader** asked to demote itself hands leadership over and
//!   answers `Unavailable` saying to call again; it stays a server.
//! - **Demotion:** the answer lists three servers; the demoted server's
//!   `tern run` stops by itself (exit code 2 naming `node.role`) while its
//!   workload runs on. Started again still as a server, it refuses to
//!   start (exit code 2): it never acts as a member again.
//! - **Back as an agent** (`role = "agent"`, no join token, the same data
//!   directory): it registers with its node id, the leader's `Status/Get`
//!   lists it as a ready agent, its own says agent, the VM stays placed on
//!   it and runs, the very workload that ran before (never stopped), and
//!   no other node holds a copy. The Raft store of its server days is
//!   moved aside.
//! - **Refusals:** demoting it again (an agent already), an unknown id,
//!   and a server when only the minimum of voters is left.
//!
//! Every wait is bounded; the processes are killed by the cluster's
//! guards if the test fails.
#![allow(clippy::unwrap_used)] // reason: tests; a failure should fail the test loudly.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tern_protocol::catalog::methods;
use tern_protocol::rpc::call_typed;
use tern_protocol::{CallError, Code, pb};
use tern_runtime::pidfile::{self, ProcessIdentity};
use tern_testkit::config;
use tern_testkit::local::LocalCluster;

/// Bound on each awaited state (debug builds on a loaded 2-core machine).
const BOUND: Duration = Duration::from_secs(90);
const CALL: Duration = Duration::from_secs(30);

async fn status(cluster: &LocalCluster, i: usize) -> Option<pb::NodeStatus> {
    let addr = cluster.nodes[i].addr().ok()?;
    call_typed(
        cluster.client.as_ref(),
        &addr,
        methods::STATUS_GET,
        &pb::StatusRequest {},
        Duration::from_secs(5),
    )
    .await
    .ok()
}

async fn vm(cluster: &LocalCluster, i: usize, id: &str) -> Option<pb::VmRecord> {
    let addr = cluster.nodes[i].addr().ok()?;
    call_typed(
        cluster.client.as_ref(),
        &addr,
        methods::VM_GET,
        &pb::GetVmRequest { vm_id: id.into() },
        Duration::from_secs(5),
    )
    .await
    .ok()
}

async fn demote(
    cluster: &LocalCluster,
    at: usize,
    node_id: u64,
) -> Result<pb::MembersResponse, CallError> {
    call_typed(
        cluster.client.as_ref(),
        &cluster.nodes[at].addr().unwrap(),
        methods::CLUSTER_DEMOTE,
        &pb::DemoteRequest { node_id },
        CALL,
    )
    .await
}

fn refusal(r: Result<pb::MembersResponse, CallError>) -> (Code, String) {
    match r {
        Err(CallError::Application(s)) => (s.code, s.message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// The live workload of `vm_id` under a node's data directory, if any.
fn workload(dir: &Path, vm_id: &str) -> Option<ProcessIdentity> {
    fn find(dir: &Path, vm_id: &str, depth: usize) -> Option<PathBuf> {
        if dir.file_name().is_some_and(|n| n == vm_id) && pidfile::pidfile_path(dir).exists() {
            return Some(dir.to_owned());
        }
        if depth == 0 {
            return None;
        }
        std::fs::read_dir(dir)
            .ok()?
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .find_map(|e| find(&e.path(), vm_id, depth - 1))
    }
    let vm_dir = find(dir, vm_id, 4)?;
    pidfile::read(&vm_dir)
        .ok()
        .flatten()
        .filter(ProcessIdentity::is_alive)
}

/// Waits until `check` answers `Some`, failing with `what` and the logs.
async fn until<T, F, Fut>(cluster: &LocalCluster, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + BOUND;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = cluster
                .nodes
                .iter()
                .map(|n| format!("--- {}:\n{}", n.log.display(), n.log_tail(25)))
                .collect();
            panic!("{what} within {BOUND:?}; logs:\n{}", logs.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The Raft id of every node by index, from `members` (keys matched to
/// the nodes' files).
fn ids(cluster: &LocalCluster, members: &pb::MembersResponse) -> Vec<u64> {
    cluster
        .nodes
        .iter()
        .map(|n| {
            let key = &n.file.as_ref().unwrap().id;
            members
                .members
                .iter()
                .find(|m| {
                    let id: String = m
                        .address
                        .as_ref()
                        .unwrap()
                        .endpoint_id
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect();
                    id == *key
                })
                .map(|m| m.node_id)
                .unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_demoted_to_an_agent_keeps_its_id_and_its_vm_running_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("c");
    let tern = Path::new(env!("CARGO_BIN_EXE_tern"));
    let mut cluster = LocalCluster::start(tern, &root, 4, &config::grpc())
        .await
        .unwrap();
    let (leader, leader_id) = cluster.wait_formed().await.unwrap();
    let ids = ids(&cluster, &cluster.members(leader).await.unwrap());

    // The leader asked to demote itself hands leadership over first.
    let (code, message) = refusal(demote(&cluster, leader, leader_id).await);
    assert_eq!(code, Code::Unavailable, "{message}");
    assert!(message.contains("leadership is moving"), "{message}");
    let (leader, _) = until(&cluster, "another node leading", || async {
        let (i, id) = cluster.leader().await.ok()?;
        (id != leader_id).then_some((i, id))
    })
    .await;
    let members = cluster.members(leader).await.unwrap();
    assert_eq!(
        members.members.iter().filter(|m| m.voter).count(),
        4,
        "the old leader is still a voter"
    );

    // A VM pinned to the server to be demoted (neither leader) runs there.
    let target = (0..4)
        .rev()
        .find(|i| *i != leader && ids[*i] != leader_id)
        .unwrap();
    let target_id = ids[target];
    let target_dir = cluster.nodes[target].dir.clone();
    let created: pb::VmRecord = call_typed(
        cluster.client.as_ref(),
        &cluster.nodes[leader].addr().unwrap(),
        methods::VM_CREATE,
        &pb::CreateVmRequest {
            request_id: "demote-web".into(),
            spec: Some(pb::VmSpec {
                name: "web".into(),
                vcpus: 1,
                memory_mib: 64,
                runtime: "process".into(),
                command: vec!["/bin/sleep".into(), "600".into()],
                pin_node: target_id,
                ..pb::VmSpec::default()
            }),
        },
        CALL,
    )
    .await
    .unwrap();
    let vm_id = created.id.clone();
    let before = until(&cluster, "the VM running on the server", || async {
        let v = vm(&cluster, leader, &vm_id).await?;
        let running = v.observed == pb::VmState::Running as i32;
        running.then(|| workload(&target_dir, &vm_id)).flatten()
    })
    .await;

    // Demotion: three servers are left; the demoted one stops by itself,
    // its workload runs on.
    let after = demote(&cluster, leader, target_id).await.unwrap();
    assert_eq!(after.members.len(), 3, "{:?}", after.members);
    assert!(
        after
            .members
            .iter()
            .all(|m| m.node_id != target_id && m.voter)
    );
    let exit = cluster.wait_exit(target, BOUND).await.unwrap();
    let log = std::fs::read_to_string(&cluster.nodes[target].log).unwrap();
    assert_eq!(exit.and_then(|s| s.code()), Some(2), "{log}");
    assert!(
        log.contains("node.role") && log.contains("demoted"),
        "{log}"
    );
    assert!(before.is_alive(), "its workload runs on");

    // Started again as a server, it refuses to.
    assert!(cluster.start_node(target).await.is_err());
    let exit = cluster.wait_exit(target, BOUND).await.unwrap();
    assert_eq!(exit.and_then(|s| s.code()), Some(2));

    // Back as an agent, with no join token: the same id, the same VM.
    cluster.make_agent(target).unwrap();
    cluster.start_node(target).await.unwrap();
    until(&cluster, "the leader hearing the agent", || async {
        let s = status(&cluster, leader).await?;
        s.agents
            .iter()
            .any(|a| a.node_id == target_id && a.status == "ready" && a.heartbeat_age_ms > 0)
            .then_some(())
    })
    .await;
    let own = status(&cluster, target).await.unwrap();
    assert_eq!(own.role, pb::RaftRole::Agent as i32);
    assert_eq!(own.node_id, target_id);
    let v = until(&cluster, "the VM running on the agent", || async {
        let v = vm(&cluster, leader, &vm_id).await?;
        (v.observed == pb::VmState::Running as i32).then_some(v)
    })
    .await;
    assert_eq!(v.node_id, target_id, "the VM stays on the same node id");
    assert_eq!(
        workload(&target_dir, &vm_id),
        Some(before),
        "the same workload, never stopped"
    );
    for (i, n) in cluster.nodes.iter().enumerate() {
        if i != target {
            assert_eq!(workload(&n.dir, &vm_id), None, "no copy on node {}", i + 1);
        }
    }
    assert!(
        !target_dir.join("raft").exists(),
        "the Raft store moved aside"
    );
    assert!(
        std::fs::read_dir(&target_dir)
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("raft.server-")),
        "kept under raft.server-*"
    );

    // Refusals.
    let (code, message) = refusal(demote(&cluster, leader, target_id).await);
    assert_eq!(code, Code::FailedPrecondition, "{message}");
    assert!(message.contains("agent already"), "{message}");
    let (code, message) = refusal(demote(&cluster, leader, 999).await);
    assert_eq!(code, Code::NotFound, "{message}");
    assert!(message.contains("999"), "{message}");
    let other = (0..4).find(|i| *i != leader && *i != target).unwrap();
    let (code, message) = refusal(demote(&cluster, leader, ids[other]).await);
    assert_eq!(code, Code::FailedPrecondition, "{message}");
    assert!(message.contains("at least 3"), "{message}");
    let members = cluster.members(leader).await.unwrap();
    assert_eq!(members.members.iter().filter(|m| m.voter).count(), 3);

    cluster.shutdown().await;
    let _ = before.signal_group(rustix::process::Signal::KILL);
}
