//! Three real nodes in one process over real transports on loopback (iroh
//! and gRPC: each scenario is written once, generic over the transport,
//! and run for both; replication also through the dual router), with sled
//! stores in temporary directories.
//!
//! Every wait is bounded ([`support::WAIT`]); nothing asserts on speed.

#![allow(clippy::unwrap_used)] // reason: test code; a failed unwrap is a failed test

mod support;

use bytes::Bytes;
use openraft::Vote;
use openraft::async_runtime::WatchReceiver;
use openraft::raft::AppendEntriesRequest;
use prost::Message;
use support::{Cluster, Dual, Grpc, Iroh, TOKEN, TestNode, TransportFactory, WAIT, call, loopback};
use tern_cluster::RaftOptions;
use tern_protocol::catalog::methods;
use tern_protocol::{CallError, Code, PeerAddr, pb};
use tern_raft_net::{SNAPSHOT_CHUNK_SIZE, wire};
use tern_store::TypeConfig;

/// Snapshots every 40 entries, 5 kept behind: a node stopped for a hundred
/// writes can only catch up by snapshot.
fn small_snapshots() -> RaftOptions {
    RaftOptions {
        snapshot_logs_since_last: 40,
        logs_to_keep_after_snapshot: 5,
        ..RaftOptions::default()
    }
}

async fn replication_failover_restart_and_snapshot<F: TransportFactory>(factory: F) {
    support::init_logs();
    let mut c = Cluster::start(factory, 3, small_snapshots()).await;

    // Elects a leader and replicates.
    let leader = c.leader().await;
    c.write_vms(0, 20).await;
    for n in &c.nodes {
        n.wait_vms(20).await;
    }

    // The leader stops: a new one is elected and writes continue.
    let old_leader = leader;
    let old_id = c.nodes[old_leader].raft().id();
    c.nodes[old_leader].stop().await;
    let new_leader = c.leader().await;
    assert_ne!(new_leader, old_leader);
    assert_ne!(c.nodes[new_leader].raft().id(), old_id);
    c.write_vms(20, 40).await;
    for n in c.nodes.iter().filter(|n| n.is_up()) {
        n.wait_vms(40).await;
    }

    // The old leader restarts from its sled state (same directory, key
    // and port) and catches up.
    let (factory, options) = (&c.factory, c.options.clone());
    c.nodes[old_leader].restart(factory, &options).await;
    assert_eq!(c.nodes[old_leader].raft().id(), old_id);
    c.nodes[old_leader].wait_vms(40).await;

    // A follower stops, falls far behind, and catches up by snapshot:
    // the leader's log is purged past the follower's last entry.
    let leader = c.leader().await;
    let behind = (0..3).find(|i| *i != leader).unwrap();
    let behind_last = c.nodes[behind]
        .raft()
        .raft()
        .metrics()
        .borrow_watched()
        .last_log_index
        .unwrap();
    c.nodes[behind].stop().await;
    // Records of 40 KiB: the snapshot spans several chunks.
    c.write_padded_vms(40, 160, 40 * 1024).await;
    let leader = c.leader().await;
    let purged = c.nodes[leader]
        .raft()
        .raft()
        .wait(Some(WAIT))
        .metrics(
            |m| m.purged.as_ref().is_some_and(|p| p.index > behind_last),
            "leader purged past the stopped follower",
        )
        .await
        .unwrap()
        .purged
        .unwrap();
    assert!(purged.index > behind_last);
    let (factory, options) = (&c.factory, c.options.clone());
    c.nodes[behind].restart(factory, &options).await;
    c.nodes[behind].wait_vms(160).await;
    let snap = c.nodes[behind]
        .raft()
        .raft()
        .wait(Some(WAIT))
        .metrics(
            |m| m.snapshot.as_ref().is_some_and(|s| s.index > behind_last),
            "follower holds a snapshot past where it stopped",
        )
        .await;
    assert!(snap.is_ok());
    let snapshot_file = c.nodes[behind]
        .dir
        .join(tern_store::SNAPSHOT_DIR)
        .join("current.snap");
    let len = std::fs::metadata(&snapshot_file).unwrap().len();
    assert!(
        len > 2 * SNAPSHOT_CHUNK_SIZE as u64,
        "the snapshot ({len} bytes) took several chunks"
    );
    c.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn iroh_cluster_replicates_fails_over_restarts_and_snapshots() {
    replication_failover_restart_and_snapshot(Iroh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_cluster_replicates_fails_over_restarts_and_snapshots() {
    replication_failover_restart_and_snapshot(Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dual_cluster_replicates_fails_over_restarts_and_snapshots() {
    replication_failover_restart_and_snapshot(Dual).await;
}

fn heartbeat_payload() -> Bytes {
    let req = AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(1000, 1),
        prev_log_id: None,
        entries: vec![],
        leader_commit: None,
    };
    wire::wrap(&req).unwrap()
}

async fn access_rules_and_node_ids<F: TransportFactory>(factory: F) {
    support::init_logs();
    let mut c = Cluster::start(factory, 2, RaftOptions::default()).await;
    let leader = c.leader().await;
    let leader_addr = c.nodes[leader].addr.clone();
    let dir = tempfile::tempdir().unwrap();

    // An outsider: a real node with its own key, not in the cluster.
    let mut outsider = TestNode::boot(&c.factory, &dir.path().join("outsider"), loopback()).await;
    let client = outsider.client();
    for node in &c.nodes {
        let err = call(
            client.as_ref(),
            &node.addr,
            methods::RAFT_APPEND_ENTRIES,
            heartbeat_payload(),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");
        assert!(err.to_string().contains("not a member"), "{err}");
    }
    let leave = pb::LeaveRequest { node_id: 1 }.encode_to_vec().into();
    let err = call(client.as_ref(), &leader_addr, methods::CLUSTER_LEAVE, leave)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");

    // Join with a wrong token is refused, on the leader and a follower.
    for node in &c.nodes {
        let join = pb::JoinRequest {
            token: "wrong".into(),
            address: Some(pb::PeerAddress::from(&outsider.addr)),
            capacity: None,
        };
        let err = call(
            client.as_ref(),
            &node.addr,
            methods::CLUSTER_JOIN,
            join.encode_to_vec().into(),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");
    }
    // The right token for someone else's address is refused too.
    let join = pb::JoinRequest {
        token: TOKEN.into(),
        address: Some(pb::PeerAddress::from(&c.nodes[0].addr)),
        capacity: None,
    };
    let err = call(
        client.as_ref(),
        &leader_addr,
        methods::CLUSTER_JOIN,
        join.encode_to_vec().into(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");

    // The outsider joins with the right token (through the follower: it
    // is redirected to the leader), then leaves, then rejoins with a
    // fresh data directory and the same key: it gets a new node id.
    let follower = (0..2).find(|i| *i != leader).unwrap();
    let seed = c.nodes[follower].addr.clone();
    outsider.join(&c.options, &seed).await;
    let first_id = outsider.raft().id();
    assert!(first_id > 2, "ids 1 and 2 are taken: {first_id}");
    let leave = pb::LeaveRequest { node_id: first_id }
        .encode_to_vec()
        .into();
    let leader = c.leader().await;
    let resp = call(
        client.as_ref(),
        &c.nodes[leader].addr,
        methods::CLUSTER_LEAVE,
        leave,
    )
    .await
    .unwrap();
    let resp = pb::LeaveResponse::decode(resp).unwrap();
    assert!(resp.members.iter().all(|m| m.node_id != first_id));
    // Once gone, it is no longer allowed to call Raft methods.
    let err = call(
        client.as_ref(),
        &c.nodes[leader].addr,
        methods::RAFT_APPEND_ENTRIES,
        heartbeat_payload(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");

    outsider.stop().await;
    let key = std::fs::read(
        outsider
            .dir
            .join(tern_transport_iroh::config::SECRET_KEY_FILE),
    )
    .unwrap();
    let fresh = dir.path().join("outsider-again");
    std::fs::create_dir_all(&fresh).unwrap();
    let key_file = fresh.join(tern_transport_iroh::config::SECRET_KEY_FILE);
    std::fs::write(&key_file, key).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let mut again = TestNode::boot(&c.factory, &fresh, loopback()).await;
    assert_eq!(again.addr.id, outsider.addr.id, "same key, same identity");
    again.join(&c.options, &leader_addr_of(&c).await).await;
    let second_id = again.raft().id();
    assert!(
        second_id > first_id,
        "node ids are never reused: {first_id} then {second_id}"
    );

    // The leader leaves on its own (it hands leadership over first, then
    // asks the new leader to remove it); writes continue without it.
    c.nodes.push(again);
    let leader = c.leader().await;
    let leaving = c.nodes[leader].raft().id();
    c.nodes[leader].raft.take().unwrap().leave().await.unwrap();
    c.nodes[leader].stop().await;
    c.write_vms(0, 5).await;
    let leader = c.leader().await;
    let membership = c.nodes[leader]
        .raft()
        .raft()
        .metrics()
        .borrow_watched()
        .membership_config
        .clone();
    assert!(membership.membership().get_node(&leaving).is_none());
    assert_eq!(membership.membership().voter_ids().count(), 2);
    c.stop_all().await;
}

async fn leader_addr_of<F: TransportFactory>(c: &Cluster<F>) -> PeerAddr {
    c.nodes[c.leader().await].addr.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn iroh_access_rules_and_node_ids() {
    access_rules_and_node_ids(Iroh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_access_rules_and_node_ids() {
    access_rules_and_node_ids(Grpc).await;
}

async fn a_member_moves_to_a_new_address<F: TransportFactory>(factory: F) {
    support::init_logs();
    let mut c = Cluster::start(factory, 3, RaftOptions::default()).await;
    c.write_vms(0, 10).await;
    let leader = c.leader().await;
    let mover = (0..3).find(|i| *i != leader).unwrap();
    let old_addr = c.nodes[mover].addr.clone();
    let (factory, options) = (&c.factory, c.options.clone());
    c.nodes[mover].restart_elsewhere(factory, &options).await;
    assert_ne!(c.nodes[mover].addr, old_addr, "a new port");
    assert_eq!(c.nodes[mover].addr.id, old_addr.id, "the same identity");
    // As a member it needs no token to update its record.
    let leader_addr = c.nodes[c.leader().await].addr.clone();
    let answer = tern_cluster::request_join(
        c.nodes[mover].client().as_ref(),
        &leader_addr,
        "",
        &c.nodes[mover].member(),
    )
    .await
    .unwrap();
    assert_eq!(answer.node_id, c.nodes[mover].raft().id(), "same node id");
    c.write_vms(10, 20).await;
    c.nodes[mover].wait_vms(20).await;
    c.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn iroh_member_moves_to_a_new_address() {
    a_member_moves_to_a_new_address(Iroh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_member_moves_to_a_new_address() {
    a_member_moves_to_a_new_address(Grpc).await;
}

/// A follower's write goes to the leader through `Raft/Propose`: committed
/// once even when retried; refused at a follower (naming the leader) and
/// for a non-member.
async fn members_propose_through_the_leader<F: TransportFactory>(factory: F) {
    support::init_logs();
    let mut c = Cluster::start(factory, 3, RaftOptions::default()).await;
    let leader = c.leader().await;
    let follower = (0..3).find(|i| *i != leader).unwrap();
    let bystander = (0..3).find(|i| *i != leader && *i != follower).unwrap();
    let leader_addr = c.nodes[leader].addr.clone();
    let client = c.nodes[follower].client();

    // A VM write a member's VM service forwards (a raw record write such
    // as `PutVm` is not one a member may propose; see tests/security.rs).
    let create = |i: u64| tern_state::Command::CreateVm {
        request_id: format!("create-{i}"),
        spec: Box::new(tern_state::VmSpec {
            name: format!("vm-{i}"),
            vcpus: 1,
            memory_mib: 64,
            runtime: "process".into(),
            ..tern_state::VmSpec::default()
        }),
    };
    let command = create(7);
    let first = tern_cluster::propose(client.as_ref(), &leader_addr, &command, WAIT)
        .await
        .unwrap();
    assert!(matches!(first, tern_state::Response::Vm(_)), "{first:?}");
    let retried = tern_cluster::propose(client.as_ref(), &leader_addr, &command, WAIT)
        .await
        .unwrap();
    assert_eq!(
        retried, first,
        "a retry is answered from the deduplication table"
    );
    c.nodes[follower].wait_vms(1).await;
    assert_eq!(c.nodes[leader].vm_count(), 1, "committed once");

    let at_follower =
        tern_cluster::propose(client.as_ref(), &c.nodes[bystander].addr, &create(8), WAIT)
            .await
            .unwrap_err();
    match at_follower {
        tern_cluster::RaftNodeError::Call {
            error: CallError::Application(s),
            ..
        } => {
            assert_eq!(s.code, Code::FailedPrecondition, "{s}");
            assert!(s.message.contains("leader"), "{s}");
        }
        other => panic!("expected FailedPrecondition, got {other}"),
    }

    let dir = tempfile::tempdir().unwrap();
    let outsider = TestNode::boot(&c.factory, &dir.path().join("outsider"), loopback()).await;
    let refused = tern_cluster::propose(outsider.client().as_ref(), &leader_addr, &create(9), WAIT)
        .await
        .unwrap_err();
    match refused {
        tern_cluster::RaftNodeError::Call {
            error: CallError::Application(s),
            ..
        } => assert_eq!(s.code, Code::PermissionDenied, "{s}"),
        other => panic!("expected PermissionDenied, got {other}"),
    }

    // A member may remove only itself: the follower asking the leader to
    // remove the bystander is refused, and the membership is unchanged.
    let bystander_id = c.nodes[bystander].raft().id();
    let leave = pb::LeaveRequest {
        node_id: bystander_id,
    }
    .encode_to_vec()
    .into();
    let err = call(client.as_ref(), &leader_addr, methods::CLUSTER_LEAVE, leave)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");
    assert!(err.to_string().contains("admin"), "{err}");
    let members = call(
        client.as_ref(),
        &leader_addr,
        methods::CLUSTER_MEMBERS,
        pb::MembersRequest {}.encode_to_vec().into(),
    )
    .await
    .unwrap();
    let members = pb::MembersResponse::decode(members).unwrap();
    assert!(
        members.members.iter().any(|m| m.node_id == bystander_id),
        "the bystander is still a member"
    );
    c.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn iroh_members_propose_through_the_leader() {
    members_propose_through_the_leader(Iroh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_members_propose_through_the_leader() {
    members_propose_through_the_leader(Grpc).await;
}

/// The metadata register: a put at a follower (by a caller that is not a
/// member) is forwarded to the leader and committed once even when
/// retried; every node then reads the write linearizably (forwarding to
/// the leader); bounds are refused as invalid; a node cut off from its
/// quorum answers a typed `Unavailable` instead of a possibly stale value.
async fn metadata_register_reads_linearizably<F: TransportFactory>(factory: F) {
    use tern_cluster::{MetaError, meta_get, meta_put};
    support::init_logs();
    let mut c = Cluster::start(factory, 3, RaftOptions::default()).await;
    let leader = c.leader().await;
    let follower = (0..3).find(|i| *i != leader).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let outsider = TestNode::boot(&c.factory, &dir.path().join("cli"), loopback()).await;
    let client = outsider.client();

    let put = meta_put(
        client.as_ref(),
        &c.nodes[follower].addr,
        "req-1",
        "zone",
        "eu-west",
        WAIT,
    )
    .await
    .unwrap();
    assert!(put.index > 0, "{put:?}");
    assert_eq!(put.leader_id, c.nodes[leader].raft().id());
    let retried = meta_put(
        client.as_ref(),
        &c.nodes[leader].addr,
        "req-1",
        "zone",
        "eu-west",
        WAIT,
    )
    .await
    .unwrap();
    assert_eq!(retried.index, put.index, "a retry is applied once");

    for node in &c.nodes {
        let read = meta_get(client.as_ref(), &node.addr, "zone", WAIT)
            .await
            .unwrap();
        assert_eq!(read.value, Some(("eu-west".to_owned(), put.index)));
        assert!(read.read_index >= put.index, "{read:?} after {put:?}");
    }
    let missing = meta_get(client.as_ref(), &c.nodes[follower].addr, "nope", WAIT)
        .await
        .unwrap();
    assert_eq!(missing.value, None);
    let bad = meta_put(
        client.as_ref(),
        &c.nodes[follower].addr,
        "req-2",
        "",
        "v",
        WAIT,
    )
    .await
    .unwrap_err();
    assert!(matches!(bad, MetaError::Invalid(_)), "{bad}");
    let bad = meta_get(
        client.as_ref(),
        &c.nodes[leader].addr,
        &"k".repeat(tern_state::MAX_META_KEY_LEN + 1),
        WAIT,
    )
    .await
    .unwrap_err();
    assert!(matches!(bad, MetaError::Invalid(_)), "{bad}");

    // Cut the leader off from its quorum: both followers stop.
    for i in 0..3 {
        if i != leader {
            c.nodes[i].stop().await;
        }
    }
    let cut_off = meta_get(client.as_ref(), &c.nodes[leader].addr, "zone", WAIT)
        .await
        .unwrap_err();
    assert!(
        matches!(cut_off, MetaError::Unavailable(_)),
        "expected Unavailable, got {cut_off}"
    );
    assert!(cut_off.is_retryable());
    let put_cut_off = meta_put(
        client.as_ref(),
        &c.nodes[leader].addr,
        "req-3",
        "zone",
        "lost",
        WAIT,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(put_cut_off, MetaError::Unavailable(_)),
        "expected Unavailable, got {put_cut_off}"
    );
    c.stop_all().await;
    let mut outsider = outsider;
    outsider.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn iroh_metadata_register_reads_linearizably() {
    metadata_register_reads_linearizably(Iroh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_metadata_register_reads_linearizably() {
    metadata_register_reads_linearizably(Grpc).await;
}
