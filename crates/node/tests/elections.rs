//! `tern_raft_elections_total` counts real elections: a 3-node cluster of
//! `tern` processes on loopback, its leader killed with SIGKILL; the node
//! that wins the next election counts it on its `/metrics`. (Before this
//! test the counter missed them: openraft's metrics watch coalesces the
//! short Candidate state away; see `tern_raft_net::metrics`.)
//!
//! Every wait is bounded; the nodes are killed by the cluster's guards if
//! the test fails.
#![allow(clippy::unwrap_used)] // reason: tests; a failure should fail the test loudly.

use std::path::Path;
use std::time::{Duration, Instant};

use tern_protocol::metric_names::RAFT_ELECTIONS;
use tern_testkit::config;
use tern_testkit::local::LocalCluster;
use tern_testkit::{Metrics, scrape};

/// Bound on a new leader's counter showing its election (scrapes of a
/// loaded machine may be slow).
const SEEN_BOUND: Duration = Duration::from_secs(60);

async fn elections(cluster: &LocalCluster, i: usize) -> f64 {
    let addr = cluster.nodes[i]
        .file
        .as_ref()
        .and_then(|f| f.metrics)
        .expect("the harness node serves /metrics");
    let text = scrape(addr).await.unwrap();
    Metrics::parse(&text).sum(RAFT_ELECTIONS, &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_that_wins_after_the_leader_dies_counts_its_election() {
    let dir = tempfile::tempdir().unwrap();
    let tern = Path::new(env!("CARGO_BIN_EXE_tern"));
    let mut cluster = LocalCluster::start(tern, &dir.path().join("c"), 3, &config::grpc())
        .await
        .unwrap();
    let (old, _) = cluster.wait_formed().await.unwrap();
    let mut before = Vec::new();
    for i in 0..3 {
        before.push(elections(&cluster, i).await);
    }
    cluster.kill(old).await.unwrap();

    let deadline = Instant::now() + SEEN_BOUND;
    loop {
        let (new, _) = cluster.leader().await.unwrap();
        assert_ne!(new, old, "a killed node cannot lead");
        let now = elections(&cluster, new).await;
        if now > before[new] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node {} leads after the kill but its {RAFT_ELECTIONS} stayed at {now} (before: {before:?}); its log:\n{}",
            new + 1,
            cluster.nodes[new].log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster.shutdown().await;
}
