//! Committed writes per second on a 3-node cluster in one process, over
//! real iroh and gRPC transports on loopback, with real synced log writes on
//! every node: `raft/commit_1_writer/{iroh,grpc}` (one writer waiting for
//! each commit) and `raft/commit_64_writers/{iroh,grpc}` (64 concurrent
//! writers, so openraft batches).
//!
//! Anchor: openraft's own benchmark (3 nodes in one process, no network,
//! no disk, M1 Max) commits 33k writes/s with 1 client and 912k with 64.
//! Criterion reports elements/s, one element per committed write. Each
//! writer updates its own VM record, so the state stays small and the
//! figures measure replication and flushes, not a growing state machine.
//!
//! Writes go through the product's write path ([`client_write`]: limits,
//! the wait for a lapsed lease). On a loaded machine leadership may still
//! move mid-run; a writer then follows the new leader, as a client does,
//! and the time it took counts in the figure.

#![allow(missing_docs)] // reason: criterion macros
#![allow(clippy::unwrap_used)] // reason: bench setup; a failure aborts the bench

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use openraft::async_runtime::WatchReceiver;
use support::{Cluster, Grpc, Iroh, TransportFactory, put_vm_in_slot};
use tern_cluster::{RaftOptions, WriteError, client_write};
use tern_raft_net::RaftInstance;
use tern_state::Command;

/// How long one write may take, leader changes included, before the
/// bench gives up.
const WRITE_DEADLINE: Duration = Duration::from_secs(30);

/// Unique VM ids across all benches of the run.
static NEXT: AtomicU64 = AtomicU64::new(0);

fn bench_transport<F: TransportFactory>(c: &mut Criterion, factory: F) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let cluster = rt.block_on(Cluster::start(factory, 3, RaftOptions::default()));
    let mut group = c.benchmark_group("raft");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Elements(1));
    for (writers, name) in [(1u64, "commit_1_writer"), (64, "commit_64_writers")] {
        group.bench_function(format!("{name}/{}", F::NAME), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let leader = cluster.leader().await;
                    let rafts: Vec<RaftInstance> = cluster
                        .nodes
                        .iter()
                        .map(|n| n.raft().raft().clone())
                        .collect();
                    let start = Instant::now();
                    let mut tasks = Vec::new();
                    for w in 0..writers {
                        let n = iters / writers + u64::from(w < iters % writers);
                        let rafts = rafts.clone();
                        tasks.push(tokio::spawn(async move {
                            let mut at = leader;
                            for _ in 0..n {
                                let i = NEXT.fetch_add(1, Ordering::Relaxed);
                                at = write(&rafts, at, put_vm_in_slot(i, w)).await;
                            }
                        }));
                    }
                    for t in tasks {
                        t.await.unwrap();
                    }
                    start.elapsed()
                })
            })
        });
    }
    group.finish();
    let mut cluster = cluster;
    rt.block_on(cluster.stop_all());
}

/// Writes `command` through node `at`, following the leader if it moved;
/// returns where it was written. Panics after [`WRITE_DEADLINE`].
async fn write(rafts: &[RaftInstance], mut at: usize, command: Command) -> usize {
    let deadline = Instant::now() + WRITE_DEADLINE;
    loop {
        let error = match client_write(&rafts[at], command.clone()).await {
            Ok(_) => return at,
            Err(e) => e,
        };
        assert!(
            Instant::now() < deadline,
            "a write failed for {WRITE_DEADLINE:?}: {error}"
        );
        if let WriteError::Limit(e) = error {
            panic!("the bench's write is over a limit: {e}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let leader = rafts[at].metrics().borrow_watched().current_leader;
        if let Some(i) = rafts
            .iter()
            .position(|r| Some(r.metrics().borrow_watched().id) == leader)
        {
            at = i;
        }
    }
}

fn benches(c: &mut Criterion) {
    bench_transport(c, Iroh);
    bench_transport(c, Grpc);
}

criterion_group!(raft, benches);
criterion_main!(raft);
