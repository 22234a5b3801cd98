//! Demoting a server to an agent with real `tern` processes on loopback:
//! four servers, a VM pinned to the one to be demoted (a process
//! workload).
//!
//! - **The leader** asked to demote itself (`Cluster/Demote`) hands
//!   leadership over and answers `Unavailable` saying to call again; it
//!   stays a server.
//! - **Demotion of the (new) leader with the CLI**, `tern cluster demote`
//!   with the first node's key (an admin): the CLI follows leadership to
//!   the next leader by itself; the answer lists three servers. The
//!   demoted server's `tern run` stops by itself (exit code 2 naming
//!   `node.role`) while its workload runs on. Started again still as a
//!   server, it refuses to start (exit code 2): it never acts as a member
//!   again.
//! - **Back as an agent** (`role = "agent"`, no join token, the same data
//!   directory): it registers with its node id, the leader's `Status/Get`
//!   lists it as a ready agent, its own says agent, the VM stays placed on
//!   it and runs, the very workload that ran before (never stopped), and
//!   no other node holds a copy. The Raft store of its server days is
//!   moved aside.
//! - **Audit:** the access log records the demotion (`demote`, its id).
//! - **Refusals:** demoting it again (an agent already), an unknown id,
//!   and a server when only the minimum of voters is left.
//!
//! Every wait is bounded; the processes are killed by the cluster's
//! guards if the test fails.
#![allow(clippy::unwrap_used)] // reason: tests; a failure should fail the test loudly.

#[path = "demotion_support/mod.rs"]
mod support;

use std::path::Path;

use support::{BOUND, CALL, back_as_agent, demote, four_servers, pinned_vm, refusal, until};
use tern_protocol::catalog::methods;
use tern_protocol::rpc::call_typed;
use tern_protocol::{Code, pb};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_demoted_to_an_agent_keeps_its_id_and_its_vm_running_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("c");
    let tern = Path::new(env!("CARGO_BIN_EXE_tern"));
    let (mut cluster, leader, leader_id, ids) = four_servers(tern, &root).await;

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
    assert!(
        members.members.iter().any(|m| m.node_id == leader_id),
        "and a member"
    );

    // The new leader is demoted with the CLI (the first node's key, an
    // admin): it moves leadership on and calls the next leader by itself.
    // A VM pinned to it runs there.
    let target = leader;
    let target_id = ids[target];
    let (vm_id, before) = pinned_vm(&cluster, leader, target, target_id).await;
    let tern_bin = tern.to_owned();
    let args = vec![
        "cluster".to_owned(),
        "--json".to_owned(),
        "demote".to_owned(),
        target_id.to_string(),
        "--data-dir".to_owned(),
        cluster.nodes[0].dir.display().to_string(),
    ];
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(tern_bin)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tern cluster demote: {stderr}");
    let after: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(after["demoted"], target_id, "{after}");
    let servers = after["members"].as_array().unwrap();
    assert_eq!(servers.len(), 3, "{after}");
    assert!(servers.iter().all(|m| m["node_id"] != target_id), "{after}");

    // The demoted server stops by itself; its workload runs on.
    let exit = cluster.wait_exit(target, BOUND).await.unwrap();
    let log = std::fs::read_to_string(&cluster.nodes[target].log).unwrap();
    assert_eq!(exit.and_then(|s| s.code()), Some(2), "{log}");
    assert!(
        log.contains("node.role") && log.contains("demoted"),
        "{log}"
    );
    assert!(before.is_alive(), "its workload runs on");

    let (leader, _) = until(&cluster, "a leader among the servers left", || async {
        cluster.leader().await.ok().filter(|(i, _)| *i != target)
    })
    .await;

    // Started again as a server, it refuses to.
    assert!(cluster.start_node(target).await.is_err());
    let exit = cluster.wait_exit(target, BOUND).await.unwrap();
    assert_eq!(exit.and_then(|s| s.code()), Some(2));

    // Back as an agent, with no join token: the same id, the same VM.
    back_as_agent(&mut cluster, leader, target, target_id, &vm_id, before).await;

    // The audit log names the demotion.
    let audit: pb::AccessListResponse = call_typed(
        cluster.client.as_ref(),
        &cluster.nodes[leader].addr().unwrap(),
        methods::CLUSTER_ACCESS_LIST,
        &pb::AccessListRequest {},
        CALL,
    )
    .await
    .unwrap();
    assert!(
        audit
            .log
            .iter()
            .any(|e| e.action == "demote" && e.node_id == target_id),
        "{:?}",
        audit.log
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
