//! A leader without a majority, with real `tern` processes on loopback:
//! three servers (too small to host the VM) and one agent running a
//! process workload. Its own binary: a test process holds one local
//! cluster (their loopback addresses come from the process id).
//!
//! Every wait is bounded; the processes are killed by the cluster's
//! guards if the test fails.
#![allow(clippy::unwrap_used)] // reason: tests; a failure should fail the test loudly.

use std::path::Path;

#[path = "demotion_support/mod.rs"]
mod support;
use support::{OneAgent, one_agent_running_a_vm, signal, until, workload};

/// A leader cut off from the other servers keeps its role (openraft
/// steps down only on a higher term) but stops acknowledging heartbeats
/// once no majority has acknowledged it for `LEADER_QUORUM_FRESH`: the
/// agent that reaches only it fences and stops its VM, as it must before
/// the majority's new leader could move the VM. Once the servers are back
/// the VM runs again, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_without_a_majority_does_not_keep_an_agent_unfenced() {
    let dir = tempfile::tempdir().unwrap();
    let tern = Path::new(env!("CARGO_BIN_EXE_tern"));
    let OneAgent {
        mut cluster,
        leader,
        agent_dir,
        vm: created,
        workload: first,
    } = one_agent_running_a_vm(tern, &dir.path().join("c"), "web").await;
    let vm_id = created.id.clone();

    // The followers stop: the leader is alone, still the leader in its
    // own eyes, and the agent can reach nobody else.
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    for &f in &followers {
        signal(&cluster, f, rustix::process::Signal::STOP);
    }
    until(
        &cluster,
        "the agent fencing and stopping its workload while the leader has no majority",
        || async { (!first.is_alive()).then_some(()) },
    )
    .await;
    for &f in &followers {
        signal(&cluster, f, rustix::process::Signal::CONT);
    }
    let again = until(
        &cluster,
        "the VM running again on the agent once the servers are back",
        || async { workload(&agent_dir, &vm_id) },
    )
    .await;
    assert_ne!(again, first, "a new workload: the fenced one was stopped");
    let v = until(&cluster, "the VM's record", || async {
        let (l, _) = cluster.leader().await.ok()?;
        support::vm(&cluster, l, &vm_id).await
    })
    .await;
    assert_eq!(v.node_id, created.node_id, "the VM stayed on its agent");
    cluster.shutdown().await;
    if let Some(w) = workload(&agent_dir, &vm_id) {
        let _ = w.signal_group(rustix::process::Signal::KILL);
    }
}
