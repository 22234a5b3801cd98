//! Heartbeats relayed by followers, with real `tern` processes on
//! loopback: three servers (too small to host the VM) and one agent
//! running a process workload. Its own binary: a test process holds one
//! local cluster (their loopback addresses come from the process id).
//!
//! - Once it runs, the agent's plain heartbeats go to its home follower,
//!   which relays them: that follower's `/metrics` counts them as relayed
//!   while the leader takes (almost) none directly.
//! - The home follower is killed (SIGKILL): the agent turns to the leader
//!   without fencing (its workload is the same process throughout) and
//!   the leader counts its heartbeats as direct ones.
//!
//! Every wait is bounded; the processes are killed by the cluster's
//! guards if the test fails.
#![allow(clippy::unwrap_used)] // reason: tests; a failure should fail the test loudly.

use std::path::Path;
use std::time::Duration;

use tern_protocol::metric_names::AGENT_HEARTBEATS;
use tern_testkit::local::LocalCluster;
use tern_testkit::{Metrics, scrape};

#[path = "demotion_support/mod.rs"]
mod support;
use support::{AGENT_DOWN_AFTER_MS, OneAgent, one_agent_running_a_vm, status, until, workload};

/// Heartbeats node `i` acknowledged by `via` (`direct` or `relay`), from
/// its `/metrics`; `None` when it does not answer.
async fn heartbeats(cluster: &LocalCluster, i: usize, via: &str) -> Option<f64> {
    let port = cluster.nodes[i].file.as_ref()?.metrics?;
    let text = scrape(port).await.ok()?;
    Some(Metrics::parse(&text).sum(AGENT_HEARTBEATS, &[("via", via)]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_relay_heartbeats_and_an_agent_outlives_its_home() {
    let dir = tempfile::tempdir().unwrap();
    let tern = Path::new(env!("CARGO_BIN_EXE_tern"));
    let OneAgent {
        mut cluster,
        leader,
        agent_dir,
        vm,
        workload: running,
    } = one_agent_running_a_vm(tern, &dir.path().join("c"), "web").await;
    let vm_id = vm.id.clone();

    // The home: the follower whose relayed count grows.
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let home = until(
        &cluster,
        "a follower relaying the agent's heartbeats",
        || async {
            for &f in &followers {
                if heartbeats(&cluster, f, "relay").await? >= 3.0 {
                    return Some(f);
                }
            }
            None
        },
    )
    .await;
    let direct_before = heartbeats(&cluster, leader, "direct").await.unwrap();
    let relayed_before = heartbeats(&cluster, home, "relay").await.unwrap();
    let relayed_after = until(&cluster, "ten more relayed heartbeats", || async {
        let n = heartbeats(&cluster, home, "relay").await?;
        (n >= relayed_before + 10.0).then_some(n)
    })
    .await;
    let direct_after = heartbeats(&cluster, leader, "direct").await.unwrap();
    assert!(
        direct_after - direct_before < relayed_after - relayed_before,
        "the leader took {} heartbeats directly while the home relayed {}",
        direct_after - direct_before,
        relayed_after - relayed_before
    );

    // The home dies: the agent goes to the leader before its fence (a
    // third of down_after) and its workload runs on, the same process.
    cluster.kill(home).await.unwrap();
    let direct_killed = heartbeats(&cluster, leader, "direct").await.unwrap();
    until(
        &cluster,
        "the leader taking the agent's heartbeats directly",
        || async {
            let n = heartbeats(&cluster, leader, "direct").await?;
            (n >= direct_killed + 5.0).then_some(())
        },
    )
    .await;
    // Watch for longer than the fence bound: the workload never stopped.
    tokio::time::sleep(Duration::from_millis(AGENT_DOWN_AFTER_MS)).await;
    assert_eq!(
        workload(&agent_dir, &vm_id),
        Some(running),
        "the agent did not fence: its workload is the same live process"
    );
    let s = status(&cluster, leader).await.unwrap();
    assert!(
        s.agents.iter().all(|a| a.status == "ready"),
        "{:?}",
        s.agents
    );
    cluster.shutdown().await;
    if let Some(w) = workload(&agent_dir, &vm_id) {
        let _ = w.signal_group(rustix::process::Signal::KILL);
    }
}
