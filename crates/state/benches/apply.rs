//! The cost of applying a VM create (and the delete that keeps the state's
//! size constant) with 1k, 10k and 100k VMs already in the state: flat,
//! since names and reserved capacity are indexed (a create used to scan
//! every VM for its name and, per member, for the capacity it reserves).
//! The same operation on every size; the report compares the rows.

#![allow(missing_docs)] // reason: criterion macros
#![allow(clippy::unwrap_used)] // reason: bench setup; a failure should stop it loudly

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use tern_protocol::{PeerAddr, PeerId};
use tern_state::{Capacity, ClusterState, Command, Member, NodeId, Response, VmRecord, VmSpec};

/// Members the VMs are spread over.
const MEMBERS: u8 = 3;

fn spec(name: String) -> VmSpec {
    VmSpec {
        name,
        vcpus: 1,
        memory_mib: 64,
        runtime: "process".into(),
        command: vec!["sleep".into(), "1".into()],
        ..VmSpec::default()
    }
}

/// A state with `n` VMs on three members large enough for all of them.
fn state_with(n: u64) -> ClusterState {
    let mut state = ClusterState::default();
    let members: std::collections::BTreeMap<NodeId, Member> = (1..=MEMBERS)
        .map(|i| {
            let addr = PeerAddr::new(PeerId::from_bytes([i; 32]));
            let capacity = Capacity {
                vcpus: u32::MAX,
                memory_mib: u64::MAX / 4,
            };
            (NodeId::from(i), Member::new(addr, capacity))
        })
        .collect();
    state.apply_membership(&members);
    for i in 0..n {
        let vm = VmRecord {
            id: format!("seed-{i}"),
            spec: spec(format!("seed-{i}")),
            node_id: i % u64::from(MEMBERS) + 1,
            ..VmRecord::default()
        };
        let r = state.apply(Command::PutVm {
            request_id: format!("seed-{i}"),
            vm: Box::new(vm),
        });
        assert!(matches!(r, Response::Vm(_)), "{r:?}");
    }
    state
}

fn apply(c: &mut Criterion) {
    let mut group = c.benchmark_group("state_apply_create_vm");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for n in [1_000u64, 10_000, 100_000] {
        let mut state = state_with(n);
        let mut i = 0u64;
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                i += 1;
                let created = state.apply(Command::CreateVm {
                    request_id: format!("c-{i}"),
                    spec: Box::new(spec(format!("bench-{i}"))),
                });
                let Response::Vm(vm) = created else {
                    panic!("create refused: {created:?}");
                };
                state.apply(Command::DeleteVm {
                    request_id: format!("d-{i}"),
                    vm_id: vm.id,
                })
            });
        });
    }
    group.finish();
}

criterion_group!(state, apply);
criterion_main!(state);
