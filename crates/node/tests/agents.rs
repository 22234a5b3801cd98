//! Servers and agents with real `tern` processes on loopback: one server
//! (too small to host the VM) and two agents (`[node] role = "agent"`)
//! running a process workload.
//!
//! - The agents register with a join token and heartbeat; `Status/Get`
//!   on the server lists both ready with a heartbeat age, and its
//!   `/metrics` counts them.
//! - A VM is placed on an agent, which runs it (its workload's pidfile
//!   names a live process) and reports it running.
//! - **Fence:** the server is stopped (SIGSTOP): the agent hears no
//!   acknowledgement and stops its VM by itself; the server resumes
//!   (SIGCONT) and, its own pause not counted as the agents' silence,
//!   keeps the VM where it was; the agent runs it again.
//! - **Down and back:** the agent is killed (SIGKILL; its workload
//!   outlives it, as workloads do); the leader marks it down and the VM
//!   starts on the other agent. The killed agent is restarted: before it
//!   starts anything it stops its old copy, and exactly one copy runs.
//!
//! Every wait is bounded; the processes are killed by the cluster's
//! guards if the test fails.
#![allow(clippy::unwrap_used)] // reason: tests; a failure should fail the test loudly.

use std::path::Path;
use std::time::Duration;

use tern_protocol::catalog::methods;
use tern_protocol::metric_names::AGENTS;
use tern_protocol::pb;
use tern_protocol::rpc::call_typed;
use tern_testkit::local::LocalCluster;

#[path = "demotion_support/mod.rs"]
mod support;
use support::{agent_servers, key_hex, signal, sleeper_vm, status, until, workload};
use tern_testkit::{Metrics, scrape};

const CALL: Duration = Duration::from_secs(5);

async fn vm(cluster: &LocalCluster, id: &str) -> Option<pb::VmRecord> {
    let addr = cluster.nodes[0].addr().ok()?;
    call_typed(
        cluster.client.as_ref(),
        &addr,
        methods::VM_GET,
        &pb::GetVmRequest { vm_id: id.into() },
        CALL,
    )
    .await
    .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_run_vms_fence_themselves_and_never_run_one_twice() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("c");
    let tern = Path::new(env!("CARGO_BIN_EXE_tern"));
    // The server is too small for the VM: it must go to an agent.
    let mut cluster = agent_servers(tern, &root, 1).await;
    let a = cluster.add_agent(&root).await.unwrap();
    let b = cluster.add_agent(&root).await.unwrap();

    // Both agents registered and heard; the server shows them.
    let agents = until(
        &cluster,
        "both agents ready and heard by the leader",
        || async {
            let s = status(&cluster, 0).await?;
            let ready = s
                .agents
                .iter()
                .filter(|a| a.status == "ready" && a.heartbeat_age_ms > 0)
                .count();
            (ready == 2).then_some(s.agents)
        },
    )
    .await;
    let id_of = |i: usize| {
        let key = cluster.nodes[i].file.as_ref().unwrap().id.clone();
        agents
            .iter()
            .find(|ag| key_hex(ag.address.as_ref()) == key)
            .map(|ag| ag.node_id)
            .unwrap()
    };
    let (id_a, id_b) = (id_of(a), id_of(b));
    let agent_status = status(&cluster, a).await.unwrap();
    assert_eq!(agent_status.role, pb::RaftRole::Agent as i32);
    assert_eq!(agent_status.node_id, id_a);
    let metrics = cluster.nodes[0].file.as_ref().unwrap().metrics.unwrap();
    until(
        &cluster,
        "the server's /metrics counting 2 ready agents",
        || async {
            let text = scrape(metrics).await.ok()?;
            let n = Metrics::parse(&text).sum(AGENTS, &[("status", "ready")]);
            (n == 2.0).then_some(())
        },
    )
    .await;

    // A VM goes to an agent and runs there.
    let created = sleeper_vm(&cluster, 0, "agents-web", "web", 0).await;
    let vm_id = created.id.clone();
    let (host, other) = if created.node_id == id_a {
        (a, b)
    } else {
        assert_eq!(created.node_id, id_b, "placed on an agent, not the server");
        (b, a)
    };
    let host_dir = cluster.nodes[host].dir.clone();
    let first = until(&cluster, "the VM running on its agent", || async {
        let v = vm(&cluster, &vm_id).await?;
        let running = v.observed == pb::VmState::Running as i32;
        running.then(|| workload(&host_dir, &vm_id)).flatten()
    })
    .await;

    // Fence: the server stops answering; the agent stops its VM by itself.
    signal(&cluster, 0, rustix::process::Signal::STOP);
    until(
        &cluster,
        "the fenced agent stopping its workload",
        || async { (!first.is_alive()).then_some(()) },
    )
    .await;
    signal(&cluster, 0, rustix::process::Signal::CONT);
    let again = until(
        &cluster,
        "the VM running again on the same agent after the server resumed",
        || async {
            let v = vm(&cluster, &vm_id).await?;
            let here = v.node_id == cluster_id(host, id_a, id_b, a);
            here.then(|| workload(&host_dir, &vm_id)).flatten()
        },
    )
    .await;
    assert_ne!(again, first, "a new workload, the fenced one was stopped");

    // Down and back: the host dies; its workload outlives it.
    cluster.kill(host).await.unwrap();
    assert!(again.is_alive(), "workloads outlive their node");
    let other_dir = cluster.nodes[other].dir.clone();
    let other_id = cluster_id(other, id_a, id_b, a);
    let moved = until(
        &cluster,
        "the VM moved to the other agent and running there",
        || async {
            let v = vm(&cluster, &vm_id).await?;
            let there = v.node_id == other_id && v.observed == pb::VmState::Running as i32;
            there.then(|| workload(&other_dir, &vm_id)).flatten()
        },
    )
    .await;
    let s = status(&cluster, 0).await.unwrap();
    let dead = s
        .agents
        .iter()
        .find(|ag| ag.node_id == cluster_id(host, id_a, id_b, a))
        .unwrap();
    assert_eq!(dead.status, "down", "the silent agent is marked down");

    cluster.start_node(host).await.unwrap();
    until(
        &cluster,
        "the returning agent stopping the copy that moved away",
        || async { (!again.is_alive()).then_some(()) },
    )
    .await;
    until(
        &cluster,
        "the returning agent marked ready again",
        || async {
            let s = status(&cluster, 0).await?;
            let back = s.agents.iter().filter(|ag| ag.status == "ready").count() == 2;
            back.then_some(())
        },
    )
    .await;
    assert!(
        moved.is_alive(),
        "the moved VM still runs on the other agent"
    );
    assert_eq!(workload(&host_dir, &vm_id), None, "one copy, not two");
    let v = vm(&cluster, &vm_id).await.unwrap();
    assert_eq!(v.node_id, other_id, "the VM stays where it moved");
    cluster.shutdown().await;
    if let Some(w) = workload(&other_dir, &vm_id) {
        let _ = w.signal_group(rustix::process::Signal::KILL);
    }
}

/// The node id of the agent at index `i` (agents `a` and the other).
fn cluster_id(i: usize, id_a: u64, id_b: u64, a: usize) -> u64 {
    if i == a { id_a } else { id_b }
}
