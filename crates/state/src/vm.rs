//! VMs: the operator's spec, the record the cluster keeps, the reports
//! reconcilers make, placement on members' capacity, and the commands that
//! create, start, stop, delete and migrate them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::command::{Rejection, Response};
use crate::member::{Capacity, NodeId};
use crate::state::ClusterState;

/// A reconciler's observation of one VM, the payload of
/// [`Command::ReportVm`](crate::Command::ReportVm).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VmReport {
    /// The VM.
    pub vm_id: String,
    /// The reporting node; must be the node the VM is placed on.
    pub node_id: NodeId,
    /// `Running`, `Stopped`, `Failed` or (after a delete) `Deleted`.
    pub observed: VmState,
    /// Why it failed, when it did.
    pub reason: String,
    /// The workload log or serial console on the node.
    pub log_path: String,
}

/// Lifecycle state of a VM, desired or observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum VmState {
    /// Not set.
    #[default]
    Unspecified,
    /// Accepted, not yet running.
    Pending,
    /// Running.
    Running,
    /// Stopped.
    Stopped,
    /// Failed; see the record's `reason`.
    Failed,
    /// Moving to another node.
    Migrating,
    /// Deleted, resources being released.
    Deleted,
}

/// What a VM is: the operator's request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct VmSpec {
    /// DNS-label-like name, unique in the cluster.
    pub name: String,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// `"microvm"` or `"process"`.
    pub runtime: String,
    /// microVM guest kernel path on the node.
    pub kernel: String,
    /// microVM initrd path on the node.
    pub initrd: String,
    /// microVM root image path on the node.
    pub image: String,
    /// microVM kernel command line.
    pub kernel_cmdline: String,
    /// Process runtime: the workload's argv.
    pub command: Vec<String>,
    /// Pin to this node (0 = placement chooses).
    pub pin_node: NodeId,
}

/// A VM as the cluster state records it (mirrors `tern.v1.VmRecord`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct VmRecord {
    /// Cluster-unique id.
    pub id: String,
    /// What was asked for.
    pub spec: VmSpec,
    /// The node it is placed on.
    pub node_id: NodeId,
    /// The state the cluster wants.
    pub desired: VmState,
    /// The state the node last reported.
    pub observed: VmState,
    /// Why it failed, when it did.
    pub reason: String,
    /// Serial console or workload log path on the node.
    pub log_path: String,
    /// Bumped by every write of the record.
    pub generation: u64,
    /// While migrating: the node it is moving to (0 = not migrating). The
    /// VM stays placed on `node_id` until that node reports it stopped.
    pub migrate_to: NodeId,
}

impl VmRecord {
    /// Whether a migration has been asked for and not handed over yet.
    pub fn is_migrating(&self) -> bool {
        self.migrate_to != 0
    }
}

/// Indexes over the VM records, kept in step with them so that no apply
/// scans every VM: the VM id of each name, and what the VMs placed on (or
/// migrating to) each node reserve. Derived data: never serialized, rebuilt
/// from the records when a state is decoded ([`VmIndex::of`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct VmIndex {
    by_name: BTreeMap<String, String>,
    /// vCPUs and MiB reserved per node (u64 sums: no saturation to undo).
    reserved: BTreeMap<NodeId, (u64, u64)>,
    /// The VMs placed on, or migrating to, each node.
    placed: BTreeMap<NodeId, std::collections::BTreeSet<String>>,
}

impl VmIndex {
    /// The index of `vms`.
    pub(crate) fn of<'a>(vms: impl IntoIterator<Item = &'a VmRecord>) -> VmIndex {
        let mut index = VmIndex::default();
        for vm in vms {
            index.add(vm);
        }
        index
    }

    /// The nodes `vm` reserves capacity on: where it is placed and, while
    /// it migrates, its target.
    pub(crate) fn nodes(vm: &VmRecord) -> impl Iterator<Item = NodeId> {
        let target = (vm.migrate_to != 0 && vm.migrate_to != vm.node_id).then_some(vm.migrate_to);
        std::iter::once(vm.node_id).chain(target)
    }

    fn add(&mut self, vm: &VmRecord) {
        self.by_name.insert(vm.spec.name.clone(), vm.id.clone());
        for node in Self::nodes(vm) {
            let r = self.reserved.entry(node).or_default();
            r.0 += u64::from(vm.spec.vcpus);
            r.1 += vm.spec.memory_mib;
            self.placed.entry(node).or_default().insert(vm.id.clone());
        }
    }

    /// The VMs placed on, or migrating to, `node`.
    pub(crate) fn on_node(&self, node: NodeId) -> impl Iterator<Item = &String> {
        self.placed.get(&node).into_iter().flatten()
    }

    fn remove(&mut self, vm: &VmRecord) {
        if self.by_name.get(&vm.spec.name) == Some(&vm.id) {
            self.by_name.remove(&vm.spec.name);
        }
        for node in Self::nodes(vm) {
            if let Some(r) = self.reserved.get_mut(&node) {
                r.0 = r.0.saturating_sub(u64::from(vm.spec.vcpus));
                r.1 = r.1.saturating_sub(vm.spec.memory_mib);
                if *r == (0, 0) {
                    self.reserved.remove(&node);
                }
            }
            if let Some(ids) = self.placed.get_mut(&node) {
                ids.remove(&vm.id);
                if ids.is_empty() {
                    self.placed.remove(&node);
                }
            }
        }
    }
}

impl ClusterState {
    /// Stores `vm` (replacing the record with its id), keeping the index,
    /// and records the change in the history.
    fn insert_vm(&mut self, vm: VmRecord) {
        if let Some(old) = self.vms.get(&vm.id) {
            self.index.remove(old);
            for node in VmIndex::nodes(old) {
                self.marks.node(node);
            }
        }
        self.index.add(&vm);
        for node in VmIndex::nodes(&vm) {
            self.marks.node(node);
        }
        self.vm_history.record(&vm, false);
        self.vms.insert(vm.id.clone(), vm);
    }

    /// Removes the record of `vm_id`, keeping the index; `last` marks the
    /// record as it goes (why it was removed), and the removal is recorded
    /// in the history with it.
    pub(crate) fn remove_vm(
        &mut self,
        vm_id: &str,
        last: impl FnOnce(&mut VmRecord),
    ) -> Option<VmRecord> {
        let mut vm = self.vms.remove(vm_id)?;
        self.index.remove(&vm);
        for node in VmIndex::nodes(&vm) {
            self.marks.node(node);
        }
        self.network.release(vm_id);
        self.user_data.remove(vm_id);
        last(&mut vm);
        self.vm_history.record(&vm, true);
        Some(vm)
    }

    /// The id of the VM named `name`, if any.
    fn vm_named(&self, name: &str) -> Option<&String> {
        self.index.by_name.get(name)
    }

    pub(crate) fn put_vm(&mut self, mut vm: Box<VmRecord>) -> Response {
        if let Some(existing) = self.vm_named(&vm.spec.name).filter(|id| **id != vm.id) {
            return Response::Rejected(Rejection::NameTaken {
                name: vm.spec.name,
                existing: existing.clone(),
            });
        }
        vm.generation = self.vms.get(&vm.id).map_or(0, |v| v.generation) + 1;
        self.insert_vm((*vm).clone());
        Response::Vm(vm)
    }

    /// What `node` has left for VMs: its declared capacity minus what the
    /// VMs placed on it, or migrating to it, reserve. Every VM reserves its
    /// vCPUs and memory whatever its state (a stopped VM can be started
    /// again without a new placement), until its record is removed. `None`
    /// if `node` is neither a member nor an agent.
    pub fn free_capacity(&self, node: NodeId) -> Option<Capacity> {
        let mut free = match self.members.get(&node) {
            Some(member) => member.capacity,
            None => self.agents.get(&node)?.capacity,
        };
        if let Some((vcpus, memory_mib)) = self.index.reserved.get(&node) {
            free.vcpus = u32::try_from(u64::from(free.vcpus).saturating_sub(*vcpus)).unwrap_or(0);
            free.memory_mib = free.memory_mib.saturating_sub(*memory_mib);
        }
        Some(free)
    }

    /// Where a VM with `spec` goes: its pinned node if it has room, else
    /// the node (a member, or an agent that is ready) with the most free
    /// memory after placement, then the most free vCPUs, then the lowest
    /// id. Deterministic: it reads only the replicated state.
    pub fn place(&self, spec: &VmSpec) -> Result<NodeId, Rejection> {
        let fits = |free: Capacity| free.vcpus >= spec.vcpus && free.memory_mib >= spec.memory_mib;
        if spec.pin_node != 0 {
            return self.check_room(spec.pin_node, spec).map(|()| spec.pin_node);
        }
        let ready_agents = self
            .agents
            .iter()
            .filter(|(_, a)| a.status == crate::agent::AgentStatus::Ready)
            .map(|(id, _)| id);
        self.members
            .keys()
            .chain(ready_agents)
            .filter_map(|id| self.free_capacity(*id).map(|free| (*id, free)))
            .filter(|(_, free)| fits(*free))
            .max_by_key(|(id, free)| (free.memory_mib, free.vcpus, std::cmp::Reverse(*id)))
            .map(|(id, _)| id)
            .ok_or(Rejection::NoCapacity {
                vcpus: spec.vcpus,
                memory_mib: spec.memory_mib,
                members: self.members.len() + self.agents.len(),
            })
    }

    /// Whether `node` is a member, or an agent that is ready, with room for
    /// `spec`.
    pub(crate) fn check_room(&self, node: NodeId, spec: &VmSpec) -> Result<(), Rejection> {
        if self
            .agents
            .get(&node)
            .is_some_and(|a| a.status == crate::agent::AgentStatus::Down)
        {
            return Err(Rejection::NodeDown { node_id: node });
        }
        let free = self
            .free_capacity(node)
            .ok_or(Rejection::UnknownNode { node_id: node })?;
        if free.vcpus >= spec.vcpus && free.memory_mib >= spec.memory_mib {
            Ok(())
        } else {
            Err(Rejection::NodeFull {
                node_id: node,
                free_vcpus: free.vcpus,
                free_memory_mib: free.memory_mib,
                vcpus: spec.vcpus,
                memory_mib: spec.memory_mib,
            })
        }
    }

    pub(crate) fn create_vm(&mut self, spec: VmSpec, user_data: String) -> Response {
        if let Some(existing) = self.vm_named(&spec.name) {
            return Response::Rejected(Rejection::NameTaken {
                existing: existing.clone(),
                name: spec.name,
            });
        }
        let node_id = match self.place(&spec) {
            Ok(node) => node,
            Err(why) => return Response::Rejected(why),
        };
        // Skip ids taken by records written with `PutVm`.
        let first_number = self.next_vm_number;
        let id = loop {
            let n = self.next_vm_number;
            let Some(next) = n.checked_add(1) else {
                return Response::Rejected(Rejection::VmIdsExhausted);
            };
            self.next_vm_number = next;
            let id = format!("vm-{n}");
            if !self.vms.contains_key(&id) {
                break id;
            }
        };
        // A refused create changes nothing, the id counter included.
        if let Err(why) = self.network.lease_to(&id) {
            self.next_vm_number = first_number;
            return Response::Rejected(why);
        }
        let vm = VmRecord {
            id: id.clone(),
            spec,
            node_id,
            desired: VmState::Running,
            observed: VmState::Pending,
            generation: 1,
            ..VmRecord::default()
        };
        if !user_data.is_empty() {
            self.user_data.insert(id.clone(), user_data);
        }
        self.insert_vm(vm.clone());
        Response::Vm(Box::new(vm))
    }

    /// Applies `change` to an existing record and bumps its generation.
    pub(crate) fn update_vm(
        &mut self,
        vm_id: String,
        change: impl FnOnce(&mut VmRecord) -> Result<(), Rejection>,
    ) -> Response {
        let Some(vm) = self.vms.get(&vm_id) else {
            return Response::Rejected(Rejection::UnknownVm { vm_id });
        };
        let mut updated = vm.clone();
        if let Err(why) = change(&mut updated) {
            return Response::Rejected(why);
        }
        updated.generation = updated.generation.saturating_add(1);
        self.insert_vm(updated.clone());
        Response::Vm(Box::new(updated))
    }

    pub(crate) fn set_vm_desired(&mut self, vm_id: String, desired: VmState) -> Response {
        if !matches!(
            desired,
            VmState::Running | VmState::Stopped | VmState::Deleted
        ) {
            return Response::Rejected(Rejection::InvalidDesiredState { state: desired });
        }
        match self.vms.get(&vm_id) {
            None => return Response::Rejected(Rejection::UnknownVm { vm_id }),
            // Deleting twice answers the record as it stands.
            Some(vm) if vm.desired == VmState::Deleted && desired == VmState::Deleted => {
                return Response::Vm(Box::new(vm.clone()));
            }
            // A VM on a node that left the cluster has no reconciler to
            // remove it: the record goes at once.
            Some(vm) if desired == VmState::Deleted && !self.is_node(vm.node_id) => {
                let removed = self.remove_vm(&vm_id, |vm| {
                    vm.desired = VmState::Deleted;
                    vm.observed = VmState::Deleted;
                    vm.generation = vm.generation.saturating_add(1);
                });
                return match removed {
                    Some(vm) => Response::Vm(Box::new(vm)),
                    None => Response::Rejected(Rejection::UnknownVm { vm_id }),
                };
            }
            Some(_) => {}
        }
        let id = vm_id.clone();
        self.update_vm(vm_id, |vm| {
            if vm.desired == VmState::Deleted {
                return Err(Rejection::VmDeleting { vm_id: id });
            }
            if desired == VmState::Deleted {
                // A deletion ends any migration: the source removes the VM.
                vm.migrate_to = 0;
            }
            if desired == VmState::Running
                && matches!(vm.observed, VmState::Failed | VmState::Stopped)
            {
                // An explicit start of a VM that ended (stopped, exited or
                // failed) is a fresh attempt: reconcilers start a VM wanted
                // running only while it is observed pending or running.
                vm.observed = VmState::Pending;
                vm.reason.clear();
            }
            vm.desired = desired;
            Ok(())
        })
    }

    pub(crate) fn report_vm(&mut self, report: VmReport) -> Response {
        let VmReport {
            vm_id,
            node_id,
            observed,
            reason,
            log_path,
        } = report;
        let Some(vm) = self.vms.get(&vm_id) else {
            return Response::Rejected(Rejection::UnknownVm { vm_id });
        };
        if vm.node_id != node_id {
            return Response::Rejected(Rejection::NotPlacedHere {
                placed_on: vm.node_id,
                vm_id,
                node_id,
            });
        }
        let removed = vm.desired == VmState::Deleted;
        let valid = match observed {
            VmState::Running | VmState::Stopped | VmState::Failed => true,
            VmState::Deleted => removed,
            _ => false,
        };
        if !valid {
            return Response::Rejected(Rejection::InvalidReport { vm_id, observed });
        }
        if observed == VmState::Deleted {
            let removed = self.remove_vm(&vm_id, |vm| {
                vm.observed = VmState::Deleted;
                vm.generation = vm.generation.saturating_add(1);
            });
            return match removed {
                Some(vm) => Response::Vm(Box::new(vm)),
                None => Response::Rejected(Rejection::UnknownVm { vm_id }),
            };
        }
        self.update_vm(vm_id, |vm| {
            if vm.is_migrating() && matches!(observed, VmState::Stopped | VmState::Failed) {
                // The source has stopped it: hand over to the target, whose
                // reconciler starts it if it is wanted running.
                vm.node_id = vm.migrate_to;
                vm.migrate_to = 0;
                vm.observed = VmState::Pending;
                vm.reason.clear();
                vm.log_path.clear();
            } else {
                vm.observed = observed;
                vm.reason = reason;
                vm.log_path = log_path;
            }
            Ok(())
        })
    }

    pub(crate) fn migrate_vm(&mut self, vm_id: String, target: NodeId) -> Response {
        let Some(vm) = self.vms.get(&vm_id) else {
            return Response::Rejected(Rejection::UnknownVm { vm_id });
        };
        if vm.desired == VmState::Deleted {
            return Response::Rejected(Rejection::VmDeleting { vm_id });
        }
        if target == vm.node_id {
            if !vm.is_migrating() {
                return Response::Rejected(Rejection::AlreadyOnNode {
                    vm_id,
                    node_id: target,
                });
            }
            // Rollback: the source keeps (and restarts, if wanted) the VM.
            return self.update_vm(vm_id, |vm| {
                vm.migrate_to = 0;
                Ok(())
            });
        }
        if vm.is_migrating() {
            if vm.migrate_to == target {
                return Response::Vm(Box::new(vm.clone()));
            }
            return Response::Rejected(Rejection::MigrationInProgress {
                target: vm.migrate_to,
                vm_id,
            });
        }
        if let Err(why) = self.check_room(target, &vm.spec) {
            return Response::Rejected(why);
        }
        self.update_vm(vm_id, |vm| {
            vm.migrate_to = target;
            Ok(())
        })
    }

    /// All VM records by id.
    pub fn vms(&self) -> &BTreeMap<String, VmRecord> {
        &self.vms
    }

    /// One VM record.
    pub fn vm(&self, id: &str) -> Option<&VmRecord> {
        self.vms.get(id)
    }

    /// The operator user data of VM `id` (empty when it has none).
    pub fn user_data(&self, id: &str) -> &str {
        self.user_data.get(id).map_or("", String::as_str)
    }
}
