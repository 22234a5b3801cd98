//! Agents: nodes that run VMs without being Raft members.
//!
//! A cluster's *servers* are its Raft members (3 to 7 voters, and
//! learners); everything else is an *agent*. An agent holds no log and no
//! state: it registers with the servers (its key admitted by a join token,
//! or already known), heartbeats to the leader, and follows the desired
//! state of the VMs placed on it. The record kept here is what the state
//! machine needs to place VMs on it and to reach it: its identity and
//! addresses, its declared capacity, and whether the leader considers it
//! up.
//!
//! - **Ids are node ids**: an agent's id is allocated by
//!   [`crate::Command::AdmitNode`] or [`crate::Command::AllocateNodeId`]
//!   like a server's, from the same sequence, so an agent can later become a
//!   server (or back) keeping its id, and labels, policies and the rollout
//!   address servers and agents alike.
//! - **Ready or down is the leader's judgement**, proposed as
//!   [`crate::Command::SetAgentStatus`] when heartbeats stop or resume.
//!   `apply` takes it as a fact and acts on it deterministically: a down
//!   agent gets no new VMs, and the VMs placed on it are moved
//!   (`ClusterState::evacuate`).
//! - **A VM is never placed on two nodes**: the record names one node; the
//!   agent that was marked down stops its VMs by itself before the leader
//!   can have marked it down (the agent's fence, in `tern-node`), and when
//!   it is heard again it follows the records, which no longer name it.

use serde::{Deserialize, Serialize};
use tern_protocol::PeerAddr;

use crate::command::{Rejection, Response};
use crate::member::{Capacity, NodeId};
use crate::network::{Ipv4Net, Lease, NetworkState};
use crate::state::ClusterState;
use crate::vm::{VmIndex, VmRecord, VmState};

/// What an agent holds of the cluster, to build its mirror from
/// ([`ClusterState::agent_mirror`]).
#[derive(Debug, Clone, Default)]
pub struct AgentView {
    /// The agent's node id.
    pub node: NodeId,
    /// The revision the assignment is as of.
    pub revision: u64,
    /// The VMs placed on it.
    pub vms: Vec<AssignedVm>,
    /// The servers (Raft members).
    pub servers: Vec<(NodeId, crate::Member)>,
    /// The transport policy the cluster wants for it.
    pub policy: Option<tern_protocol::policy::TransportConfig>,
    /// The roles granted in the cluster, by key.
    pub access: std::collections::BTreeMap<
        tern_protocol::PeerId,
        std::collections::BTreeSet<tern_protocol::access::Role>,
    >,
}

/// One VM of an agent's assignment: its record, its lease with the pool
/// (when it has an address), and its user data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssignedVm {
    /// The record.
    pub vm: VmRecord,
    /// Its address and MAC, and the pool they are in.
    pub network: Option<(Lease, Ipv4Net)>,
    /// The operator's user data for the guest.
    pub user_data: String,
}

/// Whether the leader hears an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum AgentStatus {
    /// Heartbeating: VMs may be placed on it.
    #[default]
    Ready,
    /// Not heard within the leader's bound: no VM is placed on it and the
    /// VMs it had were moved.
    Down,
}

impl AgentStatus {
    /// The status's name in tables, metrics and messages.
    pub fn name(self) -> &'static str {
        match self {
            AgentStatus::Ready => "ready",
            AgentStatus::Down => "down",
        }
    }
}

impl std::fmt::Display for AgentStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An agent as the cluster state records it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AgentRecord {
    /// Identity and addresses (the servers reach it there, e.g. to scrape
    /// its metrics for the rollout's gates).
    pub addr: PeerAddr,
    /// Resources it offers to VMs.
    pub capacity: Capacity,
    /// Ready or down.
    pub status: AgentStatus,
    /// When `status` last changed (or the agent registered), in
    /// milliseconds since the Unix epoch, by the proposer's clock.
    pub since_unix_ms: u64,
}

impl ClusterState {
    /// Current agents by node id.
    pub fn agents(&self) -> &std::collections::BTreeMap<NodeId, AgentRecord> {
        &self.agents
    }

    /// The agent with this id.
    pub fn agent(&self, node: NodeId) -> Option<&AgentRecord> {
        self.agents.get(&node)
    }

    /// The agent whose key is `peer`, with its id.
    pub fn agent_of(&self, peer: &tern_protocol::PeerId) -> Option<(NodeId, &AgentRecord)> {
        let id = self.node_ids.get(peer)?;
        self.agents.get(id).map(|a| (*id, a))
    }

    /// Whether `node` is a node of the cluster: a Raft member (server) or
    /// an agent.
    pub fn is_node(&self, node: NodeId) -> bool {
        self.members.contains_key(&node) || self.agents.contains_key(&node)
    }

    /// Every node of the cluster, servers and agents, by id.
    pub fn node_ids_all(&self) -> std::collections::BTreeSet<NodeId> {
        self.members
            .keys()
            .chain(self.agents.keys())
            .copied()
            .collect()
    }

    /// Applies a command about agents (registration, status, removal,
    /// demotion of a server); any other command changes nothing.
    pub(crate) fn apply_agent(&mut self, cmd: crate::Command) -> Response {
        use crate::Command;
        match cmd {
            Command::RegisterAgent {
                node_id,
                addr,
                capacity,
                at_unix_ms,
                ..
            } => self.register_agent(node_id, addr, capacity, at_unix_ms),
            Command::SetAgentStatus {
                node_id,
                status,
                at_unix_ms,
                ..
            } => self.set_agent_status(node_id, status, at_unix_ms),
            Command::RemoveAgent { node_id, .. } => self.remove_agent(node_id),
            Command::DemoteServer {
                node_id,
                at_unix_ms,
                ..
            } => self.demote_server(node_id, at_unix_ms),
            _ => Response::Done,
        }
    }

    /// Records an agent: its id must be the one allocated to its key, and
    /// it must not be a Raft member (a server does not register as an
    /// agent). A known agent's addresses and capacity are updated; its
    /// status is left to [`ClusterState::set_agent_status`] unless it is
    /// new (ready).
    pub(crate) fn register_agent(
        &mut self,
        node_id: NodeId,
        addr: PeerAddr,
        capacity: Capacity,
        at_unix_ms: u64,
    ) -> Response {
        if self.node_ids.get(&addr.id) != Some(&node_id) {
            return Response::Rejected(Rejection::AgentIdMismatch { node_id });
        }
        if self.members.contains_key(&node_id) {
            return Response::Rejected(Rejection::AgentIsServer { node_id });
        }
        match self.agents.get_mut(&node_id) {
            Some(agent) => {
                agent.addr = addr;
                agent.capacity = capacity;
            }
            None => {
                self.agents.insert(
                    node_id,
                    AgentRecord {
                        addr,
                        capacity,
                        status: AgentStatus::Ready,
                        since_unix_ms: at_unix_ms,
                    },
                );
            }
        }
        Response::NodeId(node_id)
    }

    /// Sets an agent's status. Marking it down moves its VMs
    /// (`ClusterState::evacuate`); the same status again changes nothing.
    pub(crate) fn set_agent_status(
        &mut self,
        node_id: NodeId,
        status: AgentStatus,
        at_unix_ms: u64,
    ) -> Response {
        let Some(agent) = self.agents.get_mut(&node_id) else {
            return Response::Rejected(Rejection::UnknownNode { node_id });
        };
        if agent.status == status {
            return Response::Done;
        }
        agent.status = status;
        agent.since_unix_ms = at_unix_ms;
        if status == AgentStatus::Down {
            self.evacuate(node_id);
        }
        Response::Done
    }

    /// Removes an agent (an admin's decision, or it became a server): its
    /// VMs are moved as for a down agent, and its id is retired unless it
    /// is a member (a promotion keeps it).
    pub(crate) fn remove_agent(&mut self, node_id: NodeId) -> Response {
        let Some(agent) = self.agents.get_mut(&node_id) else {
            return Response::Rejected(Rejection::UnknownNode { node_id });
        };
        agent.status = AgentStatus::Down;
        let peer = agent.addr.id;
        self.evacuate(node_id);
        self.agents.remove(&node_id);
        if !self.members.contains_key(&node_id) {
            self.node_ids.remove(&peer);
            self.forget_departed();
        }
        Response::Done
    }

    /// Starts demoting the member `node_id` to an agent: it gets an agent
    /// record with its member record's addresses and capacity, ready as of
    /// `at_unix_ms`, so that the membership entry that removes it leaves
    /// it a node with its id and its VMs ([`ClusterState::apply_membership`]).
    /// Until then it is both a member and an agent: a demotion under way.
    /// The same demotion again changes nothing; an agent, or an id that is
    /// no member, is refused.
    pub(crate) fn demote_server(&mut self, node_id: NodeId, at_unix_ms: u64) -> Response {
        let Some(member) = self.members.get(&node_id) else {
            return Response::Rejected(if self.agents.contains_key(&node_id) {
                Rejection::AlreadyAgent { node_id }
            } else {
                Rejection::NotAServer { node_id }
            });
        };
        self.agents.entry(node_id).or_insert_with(|| AgentRecord {
            addr: member.addr.clone(),
            capacity: member.capacity,
            status: AgentStatus::Ready,
            since_unix_ms: at_unix_ms,
        });
        Response::NodeId(node_id)
    }

    /// Whether `node` is a member being demoted to an agent: it has an
    /// agent record and is still a member (the membership entry that
    /// removes it has not applied yet).
    pub fn is_demoting(&self, node: NodeId) -> bool {
        self.members.contains_key(&node) && self.agents.contains_key(&node)
    }

    /// What the agent `node` must run: every VM placed on it (not those
    /// migrating to it, which are its only once handed over), sorted by
    /// id. Proportional to its own VMs.
    pub fn assignment(&self, node: NodeId) -> Vec<AssignedVm> {
        self.index
            .on_node(node)
            .filter_map(|id| self.vms.get(id))
            .filter(|vm| vm.node_id == node)
            .map(|vm| AssignedVm {
                vm: vm.clone(),
                network: self.network.lease(&vm.id).copied().zip(self.network.pool()),
                user_data: self.user_data(&vm.id).to_owned(),
            })
            .collect()
    }

    /// The state an agent follows, built from what the servers sent it
    /// ([`AgentView`]): only its VMs, their leases and user data; the
    /// servers as members (so the agent's access check lets the servers
    /// call it as members); the roles granted in the cluster (so an
    /// operator's `tern status` reaches it as it reaches a server); and
    /// the transport policy the cluster wants for it (already resolved by
    /// the servers: node, rollout, group or all) as its own node policy.
    /// Nothing else (no other VMs, tokens or audit log). An agent's
    /// reconciler reads it exactly as a server's reads the replicated
    /// state. The VMs' leases must share one pool (the cluster has one);
    /// a lease in another pool is dropped, so that VM starts without an
    /// address rather than in a wrong network.
    pub fn agent_mirror(view: AgentView) -> ClusterState {
        let AgentView {
            node,
            revision,
            vms,
            servers,
            policy,
            access,
        } = view;
        let pool = vms.iter().find_map(|a| a.network.map(|(_, pool)| pool));
        let mut network = NetworkState::default();
        let mut mirror = ClusterState::default();
        mirror.apply_membership(servers.iter().map(|(id, m)| (id, m)));
        if let Some(p) = policy {
            mirror.policies.nodes.insert(node, p);
        }
        mirror.access = access;
        for a in vms {
            if let Some((lease, p)) = a.network
                && Some(p) == pool
            {
                network.mirror_lease(a.vm.id.clone(), lease);
            }
            if !a.user_data.is_empty() {
                mirror.user_data.insert(a.vm.id.clone(), a.user_data);
            }
            mirror.vms.insert(a.vm.id.clone(), a.vm);
        }
        network.mirror_pool(pool);
        mirror.network = network.reindexed();
        mirror.index = VmIndex::of(mirror.vms.values());
        mirror.start_vm_history_at(revision);
        mirror
    }

    /// Moves the VMs placed on (or migrating to) `node`, which is down or
    /// leaving: a VM being deleted is removed (no reconciler will report
    /// it); a migration to it is cancelled and one away from it is handed
    /// over at once; every other VM not pinned there is placed again on
    /// another node with room, pending; a VM that is pinned there, or for
    /// which no node has room, stays, with the reason in its record. Work
    /// is proportional to the node's own VMs (the placement index), never
    /// to all VMs.
    pub(crate) fn evacuate(&mut self, node: NodeId) {
        let ids: Vec<String> = self.index.on_node(node).cloned().collect();
        for id in ids {
            let Some(vm) = self.vms.get(&id).cloned() else {
                continue;
            };
            if vm.migrate_to == node && vm.node_id != node {
                self.update_vm(id, |vm| {
                    vm.migrate_to = 0;
                    Ok(())
                });
                continue;
            }
            if vm.desired == VmState::Deleted {
                self.remove_vm(&id, |vm| {
                    vm.observed = VmState::Deleted;
                    vm.reason = format!("node {node} went down while the VM was being deleted");
                    vm.generation = vm.generation.saturating_add(1);
                });
                continue;
            }
            if vm.is_migrating() {
                let target = vm.migrate_to;
                self.update_vm(id, |vm| {
                    vm.node_id = target;
                    vm.migrate_to = 0;
                    vm.observed = VmState::Pending;
                    vm.reason = format!("handed over to node {target}: node {node} went down");
                    vm.log_path.clear();
                    Ok(())
                });
                continue;
            }
            let placed = if vm.spec.pin_node == node {
                Err(format!("pinned to node {node}, which is down"))
            } else {
                self.place(&vm.spec)
                    .map_err(|why| format!("node {node} is down and the VM could not move: {why}"))
            };
            self.update_vm(id, |vm| {
                match placed {
                    Ok(target) => {
                        vm.node_id = target;
                        vm.observed = if vm.desired == VmState::Running {
                            VmState::Pending
                        } else {
                            VmState::Stopped
                        };
                        vm.reason = format!("moved from node {node}, which went down");
                        vm.log_path.clear();
                    }
                    Err(why) => vm.reason = why,
                }
                Ok(())
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Command, Member, VmSpec};
    use tern_protocol::PeerId;

    fn peer(n: u8) -> PeerId {
        PeerId::from_bytes([n; 32])
    }

    fn cap(vcpus: u32, memory_mib: u64) -> Capacity {
        Capacity { vcpus, memory_mib }
    }

    /// One server (node 1, no capacity) and agents 2.. with `caps`.
    fn cluster(caps: &[Capacity]) -> ClusterState {
        let mut s = ClusterState::default();
        let server = Member::new(PeerAddr::new(peer(1)), Capacity::default());
        s.apply_membership([(&1, &server)]);
        for (i, c) in caps.iter().enumerate() {
            let key = peer(u8::try_from(i + 2).expect("few agents"));
            let Response::NodeId(id) = s.apply(Command::AllocateNodeId {
                request_id: format!("alloc-{i}"),
                peer: key,
            }) else {
                panic!("an id is allocated")
            };
            let r = s.apply(Command::RegisterAgent {
                request_id: format!("reg-{i}"),
                node_id: id,
                addr: PeerAddr::new(key),
                capacity: *c,
                at_unix_ms: 1,
            });
            assert_eq!(r, Response::NodeId(id));
        }
        s
    }

    fn create(s: &mut ClusterState, name: &str, pin: NodeId) -> crate::VmRecord {
        let spec = VmSpec {
            name: name.into(),
            vcpus: 1,
            memory_mib: 256,
            runtime: "process".into(),
            command: vec!["/bin/true".into()],
            pin_node: pin,
            ..VmSpec::default()
        };
        match s.apply(Command::CreateVm {
            request_id: format!("create-{name}"),
            spec: Box::new(spec),
        }) {
            Response::Vm(vm) => *vm,
            other => panic!("create refused: {other:?}"),
        }
    }

    fn down(s: &mut ClusterState, node: NodeId, req: &str) -> Response {
        s.apply(Command::SetAgentStatus {
            request_id: req.into(),
            node_id: node,
            status: AgentStatus::Down,
            at_unix_ms: 2,
        })
    }

    #[test]
    fn vms_are_placed_on_ready_agents_and_moved_off_a_down_one() {
        let mut s = cluster(&[cap(4, 4096), cap(4, 2048)]);
        let a = create(&mut s, "a", 0);
        assert_eq!(a.node_id, 2, "the agent with most free memory");
        assert_eq!(down(&mut s, 2, "d1"), Response::Done);
        let moved = &s.vms()[&a.id];
        assert_eq!(moved.node_id, 3);
        assert_eq!(moved.observed, VmState::Pending);
        assert!(moved.reason.contains("node 2"), "{}", moved.reason);
        // A down agent gets nothing new, even with the most room.
        let b = create(&mut s, "b", 0);
        assert_eq!(b.node_id, 3);
        assert_eq!(
            s.free_capacity(2),
            Some(cap(4, 4096)),
            "nothing reserved there"
        );
        // The same status again is a no-op, and ready brings it back.
        assert_eq!(down(&mut s, 2, "d2"), Response::Done);
        s.apply(Command::SetAgentStatus {
            request_id: "up".into(),
            node_id: 2,
            status: AgentStatus::Ready,
            at_unix_ms: 3,
        });
        assert_eq!(create(&mut s, "c", 0).node_id, 2);
    }

    #[test]
    fn a_pinned_vm_or_one_without_room_stays_with_the_reason() {
        let mut s = cluster(&[cap(1, 256), cap(1, 256)]);
        let pinned = create(&mut s, "pinned", 2);
        let other = create(&mut s, "other", 0);
        assert_eq!(other.node_id, 3, "agent 2 is full");
        assert_eq!(down(&mut s, 2, "d"), Response::Done);
        let p = &s.vms()[&pinned.id];
        assert_eq!(p.node_id, 2);
        assert!(p.reason.contains("pinned"), "{}", p.reason);
        assert_eq!(down(&mut s, 3, "d3"), Response::Done);
        let o = &s.vms()[&other.id];
        assert_eq!(o.node_id, 3, "no node has room");
        assert!(o.reason.contains("could not move"), "{}", o.reason);
    }

    #[test]
    fn deletions_and_migrations_finish_when_their_node_goes_down() {
        let mut s = cluster(&[cap(4, 4096), cap(4, 4096), cap(4, 4096)]);
        let del = create(&mut s, "del", 2);
        let mig = create(&mut s, "mig", 2);
        let to = create(&mut s, "to", 3);
        s.apply(Command::SetVmDesired {
            request_id: "del".into(),
            vm_id: del.id.clone(),
            desired: VmState::Deleted,
        });
        s.apply(Command::MigrateVm {
            request_id: "mig".into(),
            vm_id: mig.id.clone(),
            target: 4,
        });
        s.apply(Command::MigrateVm {
            request_id: "to".into(),
            vm_id: to.id.clone(),
            target: 2,
        });
        assert_eq!(down(&mut s, 2, "d"), Response::Done);
        assert!(!s.vms().contains_key(&del.id), "the deletion finished");
        let m = &s.vms()[&mig.id];
        assert_eq!((m.node_id, m.migrate_to), (4, 0), "handed over");
        let t = &s.vms()[&to.id];
        assert_eq!((t.node_id, t.migrate_to), (3, 0), "migration cancelled");
    }

    #[test]
    fn an_assignment_mirrors_into_a_state_the_reconciler_reads_alike() {
        let mut s = cluster(&[cap(4, 4096), cap(4, 4096)]);
        s.apply(Command::SetNetworkPool {
            request_id: "pool".into(),
            pool: "10.9.0.0/24".parse().expect("a pool"),
        });
        let a = create(&mut s, "a", 2);
        create(&mut s, "b", 3);
        let c = create(&mut s, "c", 3);
        s.apply(Command::MigrateVm {
            request_id: "m".into(),
            vm_id: c.id.clone(),
            target: 2,
        });
        let mine = s.assignment(2);
        assert_eq!(
            mine.iter().map(|v| v.vm.id.clone()).collect::<Vec<_>>(),
            vec![a.id.clone()],
            "only what is placed there; not a VM still migrating to it"
        );
        let server = crate::Member::new(PeerAddr::new(peer(1)), Capacity::default());
        let policy = tern_protocol::policy::TransportConfig::default();
        let mut access = std::collections::BTreeMap::new();
        access.insert(peer(9), [tern_protocol::access::Role::Viewer].into());
        let mirror = ClusterState::agent_mirror(AgentView {
            node: 2,
            revision: 42,
            vms: mine,
            servers: vec![(1, server)],
            policy: Some(policy.clone()),
            access,
        });
        assert_eq!(
            mirror.role_of(&peer(9)),
            Some(tern_protocol::access::Role::Viewer)
        );
        assert_eq!(mirror.vms().len(), 1);
        assert!(
            mirror.is_member_key(&peer(1)),
            "the servers are the mirror's members"
        );
        assert_eq!(
            mirror.desired_policy(2).map(|(p, _)| p.clone()),
            Some(policy)
        );
        assert_eq!(mirror.vm_history().revision(), 42);
        assert_eq!(mirror.network().lease(&a.id), s.network().lease(&a.id));
        assert_eq!(mirror.network().pool(), s.network().pool());
        assert!(mirror.agents().is_empty());
    }

    #[test]
    fn registration_is_checked_against_the_allocated_id_and_membership() {
        let mut s = cluster(&[cap(1, 1)]);
        let r = s.apply(Command::RegisterAgent {
            request_id: "wrong".into(),
            node_id: 7,
            addr: PeerAddr::new(peer(2)),
            capacity: cap(1, 1),
            at_unix_ms: 1,
        });
        assert_eq!(
            r,
            Response::Rejected(Rejection::AgentIdMismatch { node_id: 7 })
        );
        let r = s.apply(Command::RegisterAgent {
            request_id: "server".into(),
            node_id: 1,
            addr: PeerAddr::new(peer(1)),
            capacity: cap(1, 1),
            at_unix_ms: 1,
        });
        assert_eq!(
            r,
            Response::Rejected(Rejection::AgentIsServer { node_id: 1 })
        );
        assert!(s.is_node(2) && s.is_node(1) && !s.is_node(9));
        assert_eq!(s.agent_of(&peer(2)).map(|(id, _)| id), Some(2));
    }

    #[test]
    fn an_agent_that_joins_as_a_server_keeps_its_id_and_its_vms() {
        let mut s = cluster(&[cap(4, 4096)]);
        let a = create(&mut s, "a", 0);
        assert_eq!(a.node_id, 2);
        let server = Member::new(PeerAddr::new(peer(1)), Capacity::default());
        let promoted = Member::new(PeerAddr::new(peer(2)), cap(4, 4096));
        s.apply_membership([(&1, &server), (&2, &promoted)]);
        assert!(s.agent(2).is_none(), "a member, no longer an agent");
        assert_eq!(s.node_id_of(&peer(2)), Some(2));
        assert_eq!(s.vms()[&a.id].node_id, 2, "its VM stays with it");
        assert_eq!(s.free_capacity(2), Some(cap(3, 4096 - 256)));
    }

    #[test]
    fn a_removed_agent_leaves_with_its_id_retired_and_its_vms_moved() {
        let mut s = cluster(&[cap(4, 4096), cap(4, 4096)]);
        let a = create(&mut s, "a", 2);
        let b = create(&mut s, "b", 0);
        let r = s.apply(Command::RemoveAgent {
            request_id: "rm".into(),
            node_id: 2,
        });
        assert_eq!(r, Response::Done);
        assert!(s.agent(2).is_none());
        assert_eq!(s.node_id_of(&peer(2)), None, "its id is retired");
        assert_eq!(s.vms()[&a.id].node_id, 2, "pinned: stays, with the reason");
        assert_ne!(s.vms()[&b.id].node_id, 2);
    }
    #[test]
    fn a_demoted_server_keeps_its_id_labels_and_vms() {
        let mut s = cluster(&[]);
        let one = Member::new(PeerAddr::new(peer(1)), Capacity::default());
        let two = Member::new(PeerAddr::new(peer(2)), cap(4, 4096));
        s.apply_membership([(&1, &one), (&2, &two)]);
        let a = create(&mut s, "a", 0);
        assert_eq!(a.node_id, 2);
        s.apply(Command::SetNodeLabels {
            request_id: "labels".into(),
            node_id: 2,
            labels: [("zone".to_owned(), "b".to_owned())].into(),
        });
        let demote = |s: &mut ClusterState, req: &str| {
            s.apply(Command::DemoteServer {
                request_id: req.into(),
                node_id: 2,
                at_unix_ms: 5,
            })
        };
        assert_eq!(demote(&mut s, "d1"), Response::NodeId(2));
        assert!(s.is_demoting(2));
        // The same demotion again (a retry at a new leader) is no change.
        assert_eq!(demote(&mut s, "d2"), Response::NodeId(2));
        // Membership entries that still hold it (voter to learner) keep
        // the record: this is no agent joining as a server.
        s.apply_membership([(&1, &one), (&2, &two)]);
        assert!(s.is_demoting(2));
        s.apply_membership([(&1, &one)]);
        assert!(!s.is_demoting(2));
        let agent = s.agent(2).expect("an agent now");
        assert_eq!((agent.status, agent.since_unix_ms), (AgentStatus::Ready, 5));
        assert_eq!(agent.addr, two.addr);
        assert_eq!(agent.capacity, two.capacity);
        assert_eq!(s.node_id_of(&peer(2)), Some(2), "its id is kept");
        assert_eq!(s.vms()[&a.id].node_id, 2, "its VM stays with it");
        assert_eq!(s.free_capacity(2), Some(cap(3, 4096 - 256)));
        assert!(s.node_labels().contains_key(&2), "its labels stay");
        // Its key registers as the agent it is, without a token.
        let r = s.apply(Command::RegisterAgent {
            request_id: "back".into(),
            node_id: 2,
            addr: two.addr.clone(),
            capacity: two.capacity,
            at_unix_ms: 6,
        });
        assert_eq!(r, Response::NodeId(2));
        // And back: it joins as a server again with the same id.
        s.apply_membership([(&1, &one), (&2, &two)]);
        assert!(s.agent(2).is_none() && !s.is_demoting(2));
        assert_eq!(s.vms()[&a.id].node_id, 2);
    }

    #[test]
    fn only_a_member_can_be_demoted() {
        let mut s = cluster(&[cap(1, 1)]);
        let demote = |s: &mut ClusterState, node_id: NodeId| {
            s.apply(Command::DemoteServer {
                request_id: format!("d{node_id}"),
                node_id,
                at_unix_ms: 1,
            })
        };
        assert_eq!(
            demote(&mut s, 2),
            Response::Rejected(Rejection::AlreadyAgent { node_id: 2 })
        );
        assert_eq!(
            demote(&mut s, 9),
            Response::Rejected(Rejection::NotAServer { node_id: 9 })
        );
        assert!(s.agent(9).is_none());
    }

    #[test]
    fn a_server_that_leaves_without_a_demotion_gives_up_its_id() {
        let mut s = cluster(&[]);
        let one = Member::new(PeerAddr::new(peer(1)), Capacity::default());
        let two = Member::new(PeerAddr::new(peer(2)), cap(4, 4096));
        s.apply_membership([(&1, &one), (&2, &two)]);
        s.apply_membership([(&1, &one)]);
        assert_eq!(s.node_id_of(&peer(2)), None);
        assert!(s.agent(2).is_none());
    }
}
