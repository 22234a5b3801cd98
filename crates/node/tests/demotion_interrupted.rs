//! A demotion whose node does not answer, with real `tern` processes on
//! loopback: four servers, a VM pinned to the one to be demoted, which is
//! stopped (SIGSTOP) before the admin demotes it.
//!
//! - The call fails saying the node did not receive its demotion; the node
//!   is left a learner marked for demotion (still listed, not a voter),
//!   and an admin's promotion of it is refused.
//! - Resumed (SIGCONT), the node catches up, learns of its demotion and
//!   stops by itself (exit code 2); its workload runs on.
//! - `tern cluster leave` of it finishes the demotion: three servers, and
//!   restarted as an agent it comes back with its id and the very same
//!   workload, one copy.
//!
//! Every wait is bounded; the processes are killed by the cluster's
//! guards if the test fails.
#![allow(clippy::unwrap_used)] // reason: tests; a failure should fail the test loudly.

#[path = "demotion_support/mod.rs"]
mod support;

use std::path::Path;

use support::{BOUND, CALL, back_as_agent, demote, four_servers, pinned_vm, refusal};
use tern_protocol::catalog::methods;
use tern_protocol::rpc::call_typed;
use tern_protocol::{Code, pb};
use tern_testkit::local::LocalCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demotion_the_node_missed_is_finished_by_leave_once_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("c");
    let tern = Path::new(env!("CARGO_BIN_EXE_tern"));
    let (mut cluster, leader, leader_id, ids) = four_servers(tern, &root).await;
    let target = (0..4).rev().find(|i| ids[*i] != leader_id).unwrap();
    let target_id = ids[target];
    let (vm_id, before) = pinned_vm(&cluster, leader, target, target_id).await;

    // The node does not answer: the demotion stops half-way, safely.
    let signal = |c: &LocalCluster, sig| c.nodes[target].child.as_ref().unwrap().signal(sig);
    signal(&cluster, rustix::process::Signal::STOP);
    let (code, message) = refusal(demote(&cluster, leader, target_id).await);
    assert_eq!(code, Code::Unavailable, "{message}");
    assert!(
        message.contains("did not receive its demotion"),
        "{message}"
    );
    let members = cluster.members(leader).await.unwrap();
    let marked = members
        .members
        .iter()
        .find(|m| m.node_id == target_id)
        .expect("still a member");
    assert!(!marked.voter, "a learner now");
    let promoted: Result<pb::MembersResponse, _> = call_typed(
        cluster.client.as_ref(),
        &cluster.nodes[leader].addr().unwrap(),
        methods::CLUSTER_PROMOTE,
        &pb::PromoteRequest { node_id: target_id },
        CALL,
    )
    .await;
    let (code, message) = refusal(promoted);
    assert_eq!(code, Code::FailedPrecondition, "{message}");
    assert!(message.contains("being demoted"), "{message}");

    // Resumed, it learns of its demotion and stops by itself.
    signal(&cluster, rustix::process::Signal::CONT);
    let exit = cluster.wait_exit(target, BOUND).await.unwrap();
    assert_eq!(exit.and_then(|s| s.code()), Some(2));
    assert!(before.is_alive(), "its workload runs on");

    // Leave finishes the demotion: it leaves as the agent it became.
    let left: pb::LeaveResponse = call_typed(
        cluster.client.as_ref(),
        &cluster.nodes[leader].addr().unwrap(),
        methods::CLUSTER_LEAVE,
        &pb::LeaveRequest { node_id: target_id },
        CALL,
    )
    .await
    .unwrap();
    assert_eq!(left.members.len(), 3, "{:?}", left.members);
    back_as_agent(&mut cluster, leader, target, target_id, &vm_id, before).await;

    cluster.shutdown().await;
    let _ = before.signal_group(rustix::process::Signal::KILL);
}
