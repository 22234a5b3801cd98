//! A node whose addresses change while it runs is found again, and only
//! the node itself can change its recorded addresses. Real nodes in one
//! process (iroh and gRPC on loopback, sled in temporary directories):
//!
//! - a member bound to `0.0.0.0` that moves from `127.0.0.2` to
//!   `127.0.0.3` (the same socket answers both) asks the leader, through
//!   [`RaftNode::keep_address_recorded`], to record the new address; every
//!   node's membership shows it, the leader's iroh connection to it is
//!   dialled again at the new address, and writes reach it there;
//! - another member asking to record addresses in that node's name, and a
//!   stranger (no membership, no token) asking for its own, are refused,
//!   and the membership is unchanged;
//! - a leader whose own addresses change records them itself.
//!
//! Every wait is bounded ([`support::WAIT`]); nothing asserts on speed.

#![allow(clippy::unwrap_used)] // reason: test code; a failed unwrap is a failed test

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use prost::Message;
use support::{Grpc, Iroh, TOKEN, TestNode, TransportFactory, WAIT, call, loopback};
use tern_cluster::RaftOptions;
use tern_protocol::catalog::methods;
use tern_protocol::peer::IrohAddr;
use tern_protocol::{Code, PeerAddr, pb};
use tern_state::Member;

/// `node`'s address with its iroh direct address replaced by `ip` at the
/// port it is bound to.
fn at(node: &PeerAddr, ip: &str, port: u16) -> PeerAddr {
    let mut a = node.clone();
    a.iroh = Some(IrohAddr {
        direct: vec![SocketAddr::new(ip.parse().unwrap(), port)],
        relay_url: None,
    });
    a
}

/// Waits until every running node's membership records `id` at `want`.
async fn wait_recorded<F: TransportFactory>(nodes: &[TestNode<F>], id: u64, want: &PeerAddr) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let seen: Vec<Option<PeerAddr>> = nodes
            .iter()
            .map(|n| {
                n.raft()
                    .raft()
                    .metrics()
                    .borrow_watched()
                    .membership_config
                    .membership()
                    .get_node(&id)
                    .map(|m| m.addr.clone())
            })
            .collect();
        if seen.iter().all(|a| a.as_ref() == Some(want)) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "node {id} not recorded at {want:?} everywhere: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Three iroh nodes; node `mover` (0 is the first, which forms the
/// cluster and leads it) is bound to `0.0.0.0` and advertises
/// `127.0.0.2`. Returns the nodes and the mover's port.
async fn three_with_a_mover(dir: &std::path::Path, mover: usize) -> (Vec<TestNode<Iroh>>, u16) {
    let options = RaftOptions::default();
    let mut nodes: Vec<TestNode<Iroh>> = Vec::new();
    let mut port = 0;
    for i in 0..3 {
        let bind: SocketAddr = if i == mover {
            "0.0.0.0:0".parse().unwrap()
        } else {
            loopback()
        };
        let mut node = TestNode::boot(&Iroh, &dir.join(format!("n{i}")), bind).await;
        if i == mover {
            port = node.bind.port();
            node.addr = at(&node.addr, "127.0.0.2", port);
        }
        if i == 0 {
            node.initialize(&options).await;
            support::wait_leader_among(std::slice::from_ref(&node)).await;
        } else {
            let seed = nodes[0].addr.clone();
            node.join(&options, &seed).await;
        }
        nodes.push(node);
    }
    (nodes, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_moves_is_recorded_and_dialled_at_its_new_address() {
    support::init_logs();
    let dir = tempfile::tempdir().unwrap();
    let (mut nodes, port) = three_with_a_mover(dir.path(), 2).await;
    let leader = support::wait_leader_among(&nodes).await;
    assert_ne!(leader, 2, "the first node leads a cluster it formed");
    let id = nodes[2].raft().id();
    wait_recorded(&nodes, id, &nodes[2].addr).await;

    let moved = at(&nodes[2].addr, "127.0.0.3", port);
    let (tx, rx) = tokio::sync::watch::channel(nodes[2].member());
    let keeper = nodes[2].raft().keep_address_recorded(rx, String::new());
    tx.send(Member::new(moved.clone(), support::capacity()))
        .unwrap();
    wait_recorded(&nodes, id, &moved).await;

    // Writes reach the moved node, and the leader's iroh connection to it
    // was dialled at the new address.
    let resp = nodes[leader]
        .raft()
        .client_write(support::put_vm(1))
        .await
        .unwrap();
    assert!(matches!(resp.data, tern_state::Response::Vm(_)));
    nodes[2].wait_vms(1).await;
    let want: SocketAddr = format!("127.0.0.3:{port}").parse().unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let dialled = nodes[leader]
            .transport
            .as_ref()
            .unwrap()
            .client()
            .dialled(&moved.id);
        if dialled.as_deref() == Some(&[want][..]) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the leader's connection to the moved node was dialled at {dialled:?}, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(tx);
    keeper.abort();
    for n in &mut nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_member_itself_can_change_its_recorded_address() {
    support::init_logs();
    let mut cluster = support::Cluster::start(Grpc, 3, RaftOptions::default()).await;
    let leader = cluster.leader().await;
    let victim = (leader + 1) % 3;
    let other = (leader + 2) % 3;
    let victim_id = cluster.nodes[victim].raft().id();
    let before = cluster.nodes[victim].addr.clone();
    let leader_addr = cluster.nodes[leader].addr.clone();

    // Another member names the victim with an address of its choosing.
    let mut forged = before.clone();
    forged.grpc = Some("https://127.0.0.66:1".into());
    let req = pb::JoinRequest {
        token: String::new(),
        address: Some(pb::PeerAddress::from(&forged)),
        capacity: None,
    };
    let err = call(
        cluster.nodes[other].client().as_ref(),
        &leader_addr,
        methods::CLUSTER_JOIN,
        req.encode_to_vec().into(),
    )
    .await
    .expect_err("a member cannot record another node's address");
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");
    assert!(err.to_string().contains("joins as itself"), "{err}");

    // Even with the join token.
    let req = pb::JoinRequest {
        token: TOKEN.into(),
        address: Some(pb::PeerAddress::from(&forged)),
        capacity: None,
    };
    let err = call(
        cluster.nodes[other].client().as_ref(),
        &leader_addr,
        methods::CLUSTER_JOIN,
        req.encode_to_vec().into(),
    )
    .await
    .expect_err("the token does not let a member speak for another");
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");

    // A stranger without a token, naming itself or the victim.
    let dir = tempfile::tempdir().unwrap();
    let stranger = TestNode::boot(&Grpc, &dir.path().join("s"), loopback()).await;
    for named in [stranger.addr.clone(), forged.clone()] {
        let req = pb::JoinRequest {
            token: "wrong".into(),
            address: Some(pb::PeerAddress::from(&named)),
            capacity: None,
        };
        let err = call(
            stranger.client().as_ref(),
            &leader_addr,
            methods::CLUSTER_JOIN,
            req.encode_to_vec().into(),
        )
        .await
        .expect_err("a stranger is refused");
        assert!(
            matches!(
                err.code(),
                Some(Code::PermissionDenied | Code::Unauthenticated)
            ),
            "{err}"
        );
    }
    wait_recorded(&cluster.nodes, victim_id, &before).await;
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_records_its_own_new_address() {
    support::init_logs();
    let dir = tempfile::tempdir().unwrap();
    let (mut nodes, port) = three_with_a_mover(dir.path(), 0).await;
    assert_eq!(support::wait_leader_among(&nodes).await, 0);
    let id = nodes[0].raft().id();
    let moved = at(&nodes[0].addr, "127.0.0.3", port);
    let (tx, rx) = tokio::sync::watch::channel(nodes[0].member());
    let keeper = nodes[0].raft().keep_address_recorded(rx, String::new());
    tx.send(Member::new(moved.clone(), support::capacity()))
        .unwrap();
    wait_recorded(&nodes, id, &moved).await;
    // The cluster still commits, and every node applies.
    let resp = nodes[0]
        .raft()
        .client_write(support::put_vm(1))
        .await
        .unwrap();
    assert!(matches!(resp.data, tern_state::Response::Vm(_)));
    for n in &nodes {
        n.wait_vms(1).await;
    }
    drop(tx);
    keeper.abort();
    for n in &mut nodes {
        n.stop().await;
    }
}
