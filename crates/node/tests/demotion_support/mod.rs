//! What the demotion tests share: calls to the cluster's nodes, the
//! live workload of a VM under a node's data directory, bounded waits.
#![allow(dead_code)] // reason: each test binary uses its own subset.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tern_protocol::catalog::methods;
use tern_protocol::rpc::call_typed;
use tern_protocol::{CallError, Code, pb};
use tern_runtime::pidfile::{self, ProcessIdentity};
use tern_testkit::local::LocalCluster;

/// Bound on each awaited state (debug builds on a loaded 2-core machine).
pub(crate) const BOUND: Duration = Duration::from_secs(90);
pub(crate) const CALL: Duration = Duration::from_secs(30);

pub(crate) async fn status(cluster: &LocalCluster, i: usize) -> Option<pb::NodeStatus> {
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

pub(crate) async fn vm(cluster: &LocalCluster, i: usize, id: &str) -> Option<pb::VmRecord> {
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

pub(crate) async fn demote(
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

pub(crate) fn refusal<T: std::fmt::Debug>(r: Result<T, CallError>) -> (Code, String) {
    match r {
        Err(CallError::Application(s)) => (s.code, s.message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// The live workload of `vm_id` under a node's data directory, if any.
pub(crate) fn workload(dir: &Path, vm_id: &str) -> Option<ProcessIdentity> {
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

/// Agent settings of the agents' process tests: heartbeats every 200 ms,
/// down after 3 s, so the agents fence after 1 s.
pub(crate) const AGENT_HEARTBEAT_MS: u64 = 200;
pub(crate) const AGENT_DOWN_AFTER_MS: u64 = 3_000;

/// `servers` servers of `tern` under `root` (gRPC), with the agents'
/// settings above and too little capacity for a VM, so that VMs go to
/// agents.
pub(crate) async fn agent_servers(tern: &Path, root: &Path, servers: usize) -> LocalCluster {
    LocalCluster::start_tuned(tern, root, servers, &tern_testkit::config::grpc(), |c| {
        c.cluster.agent_heartbeat_interval_ms = AGENT_HEARTBEAT_MS;
        c.cluster.agent_down_after_ms = AGENT_DOWN_AFTER_MS;
        c.capacity.vcpus = 1;
        c.capacity.memory_mib = 16;
    })
    .await
    .unwrap()
}

/// Sends `sig` to node `i` (which must run).
pub(crate) fn signal(cluster: &LocalCluster, i: usize, sig: rustix::process::Signal) {
    cluster.nodes[i]
        .child
        .as_ref()
        .expect("the node runs")
        .signal(sig);
}

/// Waits until `check` answers `Some`, failing with `what` and the logs.
pub(crate) async fn until<T, F, Fut>(cluster: &LocalCluster, what: &str, mut check: F) -> T
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

/// The hex key an address names (as a node's `node.json` writes it).
pub(crate) fn key_hex(address: Option<&pb::PeerAddress>) -> String {
    address
        .unwrap()
        .endpoint_id
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The Raft id of every node by index, from `members` (keys matched to
/// the nodes' files).
pub(crate) fn ids(cluster: &LocalCluster, members: &pb::MembersResponse) -> Vec<u64> {
    cluster
        .nodes
        .iter()
        .map(|n| {
            let key = &n.file.as_ref().unwrap().id;
            members
                .members
                .iter()
                .find(|m| key_hex(m.address.as_ref()) == *key)
                .map(|m| m.node_id)
                .unwrap()
        })
        .collect()
}

/// Four servers started from `tern` under `root` and formed: the cluster,
/// the leader's index and id, and every node's id by index.
pub(crate) async fn four_servers(tern: &Path, root: &Path) -> (LocalCluster, usize, u64, Vec<u64>) {
    let cluster = LocalCluster::start(tern, root, 4, &tern_testkit::config::grpc())
        .await
        .unwrap();
    let (leader, leader_id) = cluster.wait_formed().await.unwrap();
    let ids = ids(&cluster, &cluster.members(leader).await.unwrap());
    (cluster, leader, leader_id, ids)
}

/// Creates `name`, a process VM (1 vCPU, 64 MiB, `sleep 600`), through
/// node `at` with `request_id`, pinned to `pin_node` (0: placed by the
/// cluster); its record as created.
pub(crate) async fn sleeper_vm(
    cluster: &LocalCluster,
    at: usize,
    request_id: &str,
    name: &str,
    pin_node: u64,
) -> pb::VmRecord {
    call_typed(
        cluster.client.as_ref(),
        &cluster.nodes[at].addr().unwrap(),
        methods::VM_CREATE,
        &pb::CreateVmRequest {
            request_id: request_id.into(),
            spec: Some(pb::VmSpec {
                name: name.into(),
                vcpus: 1,
                memory_mib: 64,
                runtime: "process".into(),
                command: vec!["/bin/sleep".into(), "600".into()],
                pin_node,
                ..pb::VmSpec::default()
            }),
        },
        CALL,
    )
    .await
    .unwrap()
}

/// Three agent servers ([`agent_servers`]) under `root` and one agent
/// running a sleeper VM named `name`, once the leader heard the agent.
pub(crate) struct OneAgent {
    pub(crate) cluster: LocalCluster,
    pub(crate) leader: usize,
    pub(crate) agent_dir: PathBuf,
    pub(crate) vm: pb::VmRecord,
    pub(crate) workload: ProcessIdentity,
}

pub(crate) async fn one_agent_running_a_vm(tern: &Path, root: &Path, name: &str) -> OneAgent {
    let mut cluster = agent_servers(tern, root, 3).await;
    let agent = cluster.add_agent(root).await.unwrap();
    let (leader, _) = cluster.leader().await.unwrap();
    until(
        &cluster,
        "the agent ready and heard by the leader",
        || async {
            let s = status(&cluster, leader).await?;
            let heard = s
                .agents
                .iter()
                .any(|a| a.status == "ready" && a.heartbeat_age_ms > 0);
            heard.then_some(())
        },
    )
    .await;
    let vm = sleeper_vm(&cluster, leader, &format!("{name}-create"), name, 0).await;
    let agent_dir = cluster.nodes[agent].dir.clone();
    let workload = until(&cluster, "the VM running on the agent", || async {
        workload(&agent_dir, &vm.id)
    })
    .await;
    OneAgent {
        cluster,
        leader,
        agent_dir,
        vm,
        workload,
    }
}

/// Creates a VM pinned to node `target` (Raft id `target_id`) through
/// node `at`, and waits until it runs there; its id and live workload.
pub(crate) async fn pinned_vm(
    cluster: &LocalCluster,
    at: usize,
    target: usize,
    target_id: u64,
) -> (String, ProcessIdentity) {
    let created = sleeper_vm(
        cluster,
        at,
        &format!("demote-web-{target_id}"),
        &format!("web-{target_id}"),
        target_id,
    )
    .await;
    let vm_id = created.id.clone();
    let dir = cluster.nodes[target].dir.clone();
    let running = until(cluster, "the VM running on the server", || async {
        let v = vm(cluster, at, &vm_id).await?;
        let running = v.observed == pb::VmState::Running as i32;
        running.then(|| workload(&dir, &vm_id)).flatten()
    })
    .await;
    (vm_id, running)
}

/// Restarts node `target` as an agent (no join token) and checks it comes
/// back with its id and the VM `vm_id` still placed on it, running as the
/// very workload `before`, with no copy on any other node.
pub(crate) async fn back_as_agent(
    cluster: &mut LocalCluster,
    leader: usize,
    target: usize,
    target_id: u64,
    vm_id: &str,
    before: ProcessIdentity,
) {
    cluster.make_agent(target).unwrap();
    cluster.start_node(target).await.unwrap();
    until(cluster, "the leader hearing the agent", || async {
        let s = status(cluster, leader).await?;
        s.agents
            .iter()
            .any(|a| a.node_id == target_id && a.status == "ready" && a.heartbeat_age_ms > 0)
            .then_some(())
    })
    .await;
    let own = status(cluster, target).await.unwrap();
    assert_eq!(own.role, pb::RaftRole::Agent as i32);
    assert_eq!(own.node_id, target_id);
    let v = until(cluster, "the VM running on the agent", || async {
        let v = vm(cluster, leader, vm_id).await?;
        (v.observed == pb::VmState::Running as i32).then_some(v)
    })
    .await;
    assert_eq!(v.node_id, target_id, "the VM stays on the same node id");
    let dir = &cluster.nodes[target].dir;
    assert_eq!(
        workload(dir, vm_id),
        Some(before),
        "the same workload, never stopped"
    );
    for (i, n) in cluster.nodes.iter().enumerate() {
        if i != target {
            assert_eq!(workload(&n.dir, vm_id), None, "no copy on node {}", i + 1);
        }
    }
    assert!(!dir.join("raft").exists(), "the Raft store moved aside");
    assert!(
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("raft.server-")),
        "kept under raft.server-*"
    );
}
