//! A watch on a follower of a real 3-node Raft (gRPC on loopback) keeps
//! streaming across a leader change: the leader is stopped mid-way, a new
//! one is elected, and the follower's watch delivers every change of both
//! leaders' terms once, in order, exactly as its history recorded them.
#![allow(clippy::unwrap_used)] // reason: tests fail loudly on unexpected errors.

mod support;

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use support::{Cluster, Grpc, TransportFactory, WAIT, loopback};
use tern_cluster::{RaftConsensus, RaftOptions};
use tern_protocol::catalog::methods;
use tern_protocol::{Dispatcher, ServiceId, StreamCall, pb};
use tern_runtime::RuntimeKind;
use tern_services::consensus::Consensus;
use tern_services::vm::VmService;

/// A VM create, one of the writes a follower may forward (zero-sized:
/// placement always finds room).
fn create(i: u64) -> tern_state::Command {
    tern_state::Command::CreateVm {
        request_id: format!("create-{i}"),
        spec: Box::new(tern_state::VmSpec {
            name: format!("w{i}"),
            runtime: "process".into(),
            ..tern_state::VmSpec::default()
        }),
    }
}

/// Writes `cmd` through the follower's consensus (forwarded to whoever
/// leads), retrying (same request id) while an election runs.
async fn write(consensus: &dyn Consensus, cmd: tern_state::Command) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match consensus.write(cmd.clone()).await {
            Ok(_) => return,
            Err(e) => {
                assert!(tokio::time::Instant::now() < deadline, "write failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followers_watch_continues_across_a_leader_change() {
    support::init_logs();
    let options = RaftOptions {
        snapshot_logs_since_last: 40,
        logs_to_keep_after_snapshot: 5,
        ..RaftOptions::default()
    };
    let mut c = Cluster::start(Grpc, 3, options).await;
    let leader = c.leader().await;
    let f = (leader + 1) % 3;
    // The follower's Raft, behind the services' consensus and a VM
    // service served on a transport of its own.
    let raft = Arc::new(c.nodes[f].raft.take().unwrap());
    let consensus: Arc<dyn Consensus> = RaftConsensus::new(raft.clone(), c.nodes[f].client());
    let vm = VmService::new(consensus.clone(), RuntimeKind::Process);
    let server = Grpc
        .start(
            [0x77; 32],
            loopback(),
            Arc::new(Dispatcher::new().register(ServiceId::Vm, vm.handler())),
        )
        .await;
    let client = Grpc
        .start([0x78; 32], loopback(), Arc::new(Dispatcher::new()))
        .await;
    let since = consensus.query(|s| s.vm_history().revision()).unwrap();
    let req = pb::WatchVmsRequest {
        from_revision: since,
        vm_id: String::new(),
    };
    let call =
        StreamCall::new(methods::VM_WATCH, req.encode_to_vec().into()).with_idle_timeout(WAIT);
    let mut watch = Grpc::client(&client)
        .open_stream(&Grpc::addr(&server), call)
        .await
        .unwrap();

    for i in 0..30 {
        write(&*consensus, create(i)).await;
    }
    // The leader goes away; the other two elect one of them.
    c.nodes[leader].stop().await;
    for i in 30..60 {
        write(&*consensus, create(i)).await;
    }
    let mut got = Vec::new();
    while got.len() < 60 {
        let m = tokio::time::timeout(WAIT, watch.receiver.next())
            .await
            .expect("an event within the bound")
            .expect("the stream goes on")
            .expect("an event");
        let e = pb::VmEvent::decode(m).unwrap();
        if !e.progress {
            got.push((e.revision, e.vm.unwrap().spec.unwrap_or_default().name));
        }
    }
    let held: Vec<(u64, String)> = consensus
        .query(|s| {
            s.vm_history()
                .events()
                .filter(|e| e.revision > since)
                .map(|e| (e.revision, e.vm.spec.name.clone()))
                .collect()
        })
        .unwrap();
    assert_eq!(got, held, "every change once, in order");
    let ids: Vec<String> = (0..60).map(|i| format!("w{i}")).collect();
    assert_eq!(got.iter().map(|g| g.1.clone()).collect::<Vec<_>>(), ids);
    let term_now = {
        use openraft::async_runtime::WatchReceiver;
        raft.raft().metrics().borrow_watched().current_term
    };
    assert!(term_now > 1, "a new leader was elected (term {term_now})");

    drop(watch);
    Grpc::stop(client).await;
    Grpc::stop(server).await;
    drop((vm, consensus));
    if let Ok(raft) = Arc::try_unwrap(raft) {
        raft.shutdown().await.unwrap();
    }
    c.stop_all().await;
}
