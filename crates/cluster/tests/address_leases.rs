//! Guest addresses are leased by the replicated state machine: three real
//! nodes over gRPC on loopback with sled stores. VMs created before and
//! after the leader stops get distinct addresses from the pool; a full
//! pool refuses a create; the old leader restarts from its own state and
//! holds exactly the same leases as the others; a deleted VM's address
//! goes to the next VM on every node alike.
//!
//! Every wait is bounded ([`support::WAIT`]).

#![allow(clippy::unwrap_used)] // reason: test code; a failed unwrap is a failed test

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use support::{Cluster, Grpc, TestNode, TransportFactory, WAIT};
use tern_cluster::RaftOptions;
use tern_state::{Command, Lease, Rejection, Response, VmSpec};

fn create(name: &str) -> Command {
    Command::CreateVm {
        request_id: format!("create-{name}"),
        spec: Box::new(VmSpec {
            name: name.into(),
            vcpus: 1,
            memory_mib: 64,
            runtime: "process".into(),
            command: vec!["sleep".into(), "600".into()],
            ..VmSpec::default()
        }),
    }
}

fn leases<F: TransportFactory>(node: &TestNode<F>) -> BTreeMap<String, Lease> {
    node.raft()
        .state()
        .read(|s| s.network().leases().clone())
        .unwrap()
}

/// Waits until `node` holds `want` leases; returns them.
async fn wait_leases<F: TransportFactory>(
    node: &TestNode<F>,
    want: usize,
) -> BTreeMap<String, Lease> {
    wait_for(node, &format!("{want} leases"), |held| held.len() == want).await
}

/// Waits until `node`'s leases satisfy `done` (`what` names it in the
/// failure); returns them. A follower applies the leader's entries a
/// little later, so a check of a later state must wait for that state,
/// not for a count an earlier state also has.
async fn wait_for<F: TransportFactory>(
    node: &TestNode<F>,
    what: &str,
    done: impl Fn(&BTreeMap<String, Lease>) -> bool,
) -> BTreeMap<String, Lease> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let held = leases(node);
        if done(&held) {
            return held;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "node {} holds {} leases ({held:?}), waiting for {what}",
            node.raft().id(),
            held.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn created(r: Response) -> String {
    match r {
        Response::Vm(vm) => vm.id,
        other => panic!("expected a VM, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leases_are_unique_and_the_same_on_every_node_across_failover_and_restart() {
    support::init_logs();
    let mut c = Cluster::start(Grpc, 3, RaftOptions::default()).await;
    let pool = "10.213.7.0/29".parse().unwrap();
    let set = Command::SetNetworkPool {
        request_id: "pool".into(),
        pool,
    };
    assert_eq!(c.write(set).await, Response::Done);

    for name in ["a", "b", "c"] {
        created(c.write(create(name)).await);
    }
    // The leader stops; the next one leases from where it left off.
    let old = c.leader().await;
    c.nodes[old].stop().await;
    let new = c.leader().await;
    assert_ne!(new, old);
    for name in ["d", "e"] {
        created(c.write(create(name)).await);
    }
    let full = c.write(create("f")).await;
    assert!(
        matches!(
            full,
            Response::Rejected(Rejection::AddressPoolExhausted { leased: 5, .. })
        ),
        "{full:?}"
    );
    let at_new = wait_leases(&c.nodes[new], 5).await;
    let addresses: BTreeSet<Ipv4Addr> = at_new.values().map(|l| l.address).collect();
    assert_eq!(addresses.len(), 5, "no address twice: {at_new:?}");
    assert!(addresses.iter().all(|a| pool.contains(*a)));

    // The old leader restarts from its own sled state and agrees.
    let (factory, options) = (&c.factory, c.options.clone());
    c.nodes[old].restart(factory, &options).await;
    for node in c.nodes.iter() {
        assert_eq!(wait_leases(node, 5).await, at_new);
    }

    // A deleted VM's address goes to the next VM, on every node alike.
    let (gone, freed) = at_new
        .iter()
        .next()
        .map(|(id, l)| (id.clone(), *l))
        .unwrap();
    c.write(Command::DeleteVm {
        request_id: "delete".into(),
        vm_id: gone.clone(),
    })
    .await;
    let next = created(c.write(create("g")).await);
    for node in c.nodes.iter() {
        let held = wait_for(node, "the delete and the next create", |held| {
            held.contains_key(&next)
        })
        .await;
        assert_eq!(held.len(), 5, "{held:?}");
        assert!(!held.contains_key(&gone), "{held:?}");
        assert_eq!(held.get(&next), Some(&freed), "node {}", node.raft().id());
    }
    c.stop_all().await;
}
