//! What servers and agents exchange about VMs: an agent's assignment
//! (the VMs placed on it) as `tern.v1.AgentAssignment`, both ways.
//!
//! The servers send an agent its whole assignment on each change
//! (`Cluster/AgentSync`, served in `tern-cluster`); the agent turns it
//! back into a partial cluster state (`ClusterState::agent_mirror`) that
//! its reconciler reads exactly as a server's reconciler reads the
//! replicated state. Decoding is strict: a message from the network with a
//! malformed VM id, state, address or spec is refused whole with a typed
//! [`AssignmentError`] naming the VM and field, never half applied (an
//! agent acting on half an assignment could stop VMs it should run).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use tern_protocol::access::Role;
use tern_protocol::{PeerId, pb};
use tern_state::network::mac_of;
use tern_state::{AssignedVm, Ipv4Net, Lease, VmRecord, VmState};

use crate::vm::{from_pb_spec, pb_state, to_pb_spec};

/// The most VMs one assignment may carry: an agent runs tens of VMs;
/// a message claiming more is refused rather than allocated.
pub const MAX_ASSIGNED_VMS: usize = 4096;

/// Why an assignment from a server was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssignmentError {
    /// More VMs than [`MAX_ASSIGNED_VMS`].
    #[error("the assignment lists {count} VMs, more than the limit of {MAX_ASSIGNED_VMS}")]
    TooMany {
        /// How many it listed.
        count: usize,
    },
    /// The grants are malformed.
    #[error("field `grants`: {0}")]
    Grants(String),
    /// A field of one VM is malformed.
    #[error("VM {vm_id:?}: field `{field}`: {why}")]
    Field {
        /// The VM (as sent).
        vm_id: String,
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        why: String,
    },
}

/// The roles of an assignment's grants, checked: at most
/// [`tern_state::MAX_ACCESS_KEYS`] keys of 32 bytes with known role names.
pub fn from_pb_grants(
    grants: &[pb::AccessGrant],
) -> Result<BTreeMap<PeerId, BTreeSet<Role>>, AssignmentError> {
    if grants.len() > tern_state::MAX_ACCESS_KEYS {
        return Err(AssignmentError::Grants(format!(
            "{} keys, more than the limit of {}",
            grants.len(),
            tern_state::MAX_ACCESS_KEYS
        )));
    }
    grants
        .iter()
        .map(|g| {
            let key = <[u8; 32]>::try_from(g.key.as_ref())
                .map(PeerId::from_bytes)
                .map_err(|_| {
                    AssignmentError::Grants(format!("a key of {} bytes (32 expected)", g.key.len()))
                })?;
            let roles = g
                .roles
                .iter()
                .map(|r| {
                    Role::from_name(r)
                        .ok_or_else(|| AssignmentError::Grants(format!("unknown role {r:?}")))
                })
                .collect::<Result<BTreeSet<Role>, _>>()?;
            Ok((key, roles))
        })
        .collect()
}

/// The VMs of an assignment as `tern.v1.AgentVm`s.
pub fn to_pb_vms(vms: &[AssignedVm]) -> Vec<pb::AgentVm> {
    vms.iter().map(to_pb_vm).collect()
}

fn to_pb_vm(a: &AssignedVm) -> pb::AgentVm {
    let vm = &a.vm;
    pb::AgentVm {
        id: vm.id.clone(),
        spec: Some(to_pb_spec(&vm.spec)),
        desired: pb_state(vm.desired) as i32,
        observed: pb_state(vm.observed) as i32,
        reason: vm.reason.clone(),
        log_path: vm.log_path.clone(),
        generation: vm.generation,
        migrate_to: vm.migrate_to,
        address: a.network.map_or_else(String::new, |(lease, pool)| {
            format!("{}/{}", lease.address, pool.prefix())
        }),
        user_data: a.user_data.clone(),
    }
}

/// The VMs of a `tern.v1.AgentAssignment` for node `node_id`, checked.
pub fn from_pb_vms(
    node_id: u64,
    vms: Vec<pb::AgentVm>,
) -> Result<Vec<AssignedVm>, AssignmentError> {
    if vms.len() > MAX_ASSIGNED_VMS {
        return Err(AssignmentError::TooMany { count: vms.len() });
    }
    vms.into_iter().map(|v| from_pb_vm(node_id, v)).collect()
}

fn state_of(vm_id: &str, field: &'static str, value: i32) -> Result<VmState, AssignmentError> {
    let state = pb::VmState::try_from(value).map_err(|_| AssignmentError::Field {
        vm_id: vm_id.to_owned(),
        field,
        why: format!("{value} is not a VM state"),
    })?;
    Ok(match state {
        pb::VmState::Unspecified => VmState::Unspecified,
        pb::VmState::Pending => VmState::Pending,
        pb::VmState::Running => VmState::Running,
        pb::VmState::Stopped => VmState::Stopped,
        pb::VmState::Failed => VmState::Failed,
        pb::VmState::Migrating => VmState::Migrating,
        pb::VmState::Deleted => VmState::Deleted,
    })
}

/// `"10.9.0.2/24"` as a lease and its pool.
fn network_of(vm_id: &str, address: &str) -> Result<Option<(Lease, Ipv4Net)>, AssignmentError> {
    if address.is_empty() {
        return Ok(None);
    }
    let bad = |why: String| AssignmentError::Field {
        vm_id: vm_id.to_owned(),
        field: "address",
        why,
    };
    let (ip, prefix) = address
        .split_once('/')
        .ok_or_else(|| bad(format!("{address:?} is not ADDRESS/PREFIX")))?;
    let ip: Ipv4Addr = ip
        .parse()
        .map_err(|_| bad(format!("{ip:?} is not an IPv4 address")))?;
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| *p <= 32)
        .ok_or_else(|| bad(format!("{prefix:?} is not a prefix length (0 to 32)")))?;
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    let pool = Ipv4Net::new(Ipv4Addr::from(u32::from(ip) & mask), prefix)
        .ok_or_else(|| bad(format!("{address:?} names no network")))?;
    Ok(Some((
        Lease {
            address: ip,
            mac: mac_of(ip),
        },
        pool,
    )))
}

fn from_pb_vm(node_id: u64, v: pb::AgentVm) -> Result<AssignedVm, AssignmentError> {
    tern_runtime::spec::check_vm_id(&v.id).map_err(|why| AssignmentError::Field {
        vm_id: v.id.clone(),
        field: "id",
        why: why.to_string(),
    })?;
    let spec = v.spec.ok_or_else(|| AssignmentError::Field {
        vm_id: v.id.clone(),
        field: "spec",
        why: "missing".into(),
    })?;
    let network = network_of(&v.id, &v.address)?;
    let vm = VmRecord {
        desired: state_of(&v.id, "desired", v.desired)?,
        observed: state_of(&v.id, "observed", v.observed)?,
        id: v.id,
        spec: from_pb_spec(spec),
        node_id,
        reason: v.reason,
        log_path: v.log_path,
        generation: v.generation,
        migrate_to: v.migrate_to,
    };
    Ok(AssignedVm {
        vm,
        network,
        user_data: v.user_data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_state::{ClusterState, Command, Response, VmSpec};

    fn assigned() -> Vec<AssignedVm> {
        let mut s = ClusterState::default();
        let server = tern_state::Member::new(
            tern_protocol::PeerAddr::new(tern_protocol::PeerId::from_bytes([1; 32])),
            tern_state::Capacity {
                vcpus: 8,
                memory_mib: 8192,
            },
        );
        s.apply_membership([(&1, &server)]);
        s.apply(Command::SetNetworkPool {
            request_id: "pool".into(),
            pool: "10.9.0.0/24".parse().expect("a pool"),
        });
        let Response::Vm(_) = s.apply(Command::CreateVmWithData {
            request_id: "c".into(),
            spec: Box::new(VmSpec {
                name: "web".into(),
                vcpus: 1,
                memory_mib: 64,
                runtime: "process".into(),
                command: vec!["/bin/sleep".into(), "60".into()],
                ..VmSpec::default()
            }),
            user_data: "hello".into(),
        }) else {
            panic!("created")
        };
        s.assignment(1)
    }

    #[test]
    fn an_assignment_survives_the_wire() {
        let vms = assigned();
        let back = from_pb_vms(1, to_pb_vms(&vms)).expect("decodes");
        assert_eq!(back, vms);
    }

    #[test]
    fn a_malformed_vm_refuses_the_whole_assignment_naming_it() {
        let good = to_pb_vms(&assigned());
        let mut bad_id = good.clone();
        bad_id[0].id = "../etc".into();
        let mut bad_state = good.clone();
        bad_state[0].desired = 99;
        let mut bad_address = good.clone();
        bad_address[0].address = "10.9.0.2/40".into();
        let mut no_spec = good.clone();
        no_spec[0].spec = None;
        for (case, field) in [
            (bad_id, "id"),
            (bad_state, "desired"),
            (bad_address, "address"),
            (no_spec, "spec"),
        ] {
            match from_pb_vms(1, case) {
                Err(AssignmentError::Field { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        let many = vec![good[0].clone(); MAX_ASSIGNED_VMS + 1];
        assert_eq!(
            from_pb_vms(1, many),
            Err(AssignmentError::TooMany {
                count: MAX_ASSIGNED_VMS + 1
            })
        );
    }

    #[test]
    fn grants_are_checked() {
        let good = pb::AccessGrant {
            key: vec![7; 32].into(),
            roles: vec!["viewer".into(), "admin".into()],
        };
        let map = from_pb_grants(std::slice::from_ref(&good)).expect("decodes");
        assert_eq!(map[&PeerId::from_bytes([7; 32])].len(), 2);
        let short = pb::AccessGrant {
            key: vec![7; 31].into(),
            ..good.clone()
        };
        let root = pb::AccessGrant {
            roles: vec!["root".into()],
            ..good
        };
        assert!(matches!(
            from_pb_grants(&[short]),
            Err(AssignmentError::Grants(_))
        ));
        assert!(matches!(
            from_pb_grants(&[root]),
            Err(AssignmentError::Grants(_))
        ));
    }

    proptest::proptest! {
        /// Any bytes decode to an assignment or to an error, never a panic.
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..2048)) {
            use prost::Message;
            if let Ok(msg) = pb::AgentAssignment::decode(bytes.as_slice()) {
                let _ = from_pb_grants(&msg.grants);
                let _ = from_pb_vms(3, msg.vms);
            }
        }
    }
}
