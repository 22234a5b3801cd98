//! Which nodes' assignments an apply may have changed: derived
//! bookkeeping that lets a server wake only the assignment streams of the
//! agents a write concerns.
//!
//! An agent's assignment ([`ClusterState::assignment`] with its status,
//! the transport policy wanted for it, the roles granted and the servers)
//! is read again by the server that streams it whenever it may have
//! changed. Waking every agent's stream on every write costs a server work
//! proportional to its agents on each commit, and every stream's read
//! contends with the apply for the state's lock: at 1,000 agents that is
//! what made commits slower. So each apply *marks* the nodes whose
//! assignment it may have changed, and a server compares marks
//! ([`ClusterState::assignment_mark`]) instead of assignments:
//!
//! - a VM record stored or removed marks the nodes it was and is placed
//!   on (and its migration target), whichever command did it;
//! - an agent's registration, status or removal marks that agent (all
//!   nodes while a rollout exists: its stages count the agents);
//! - a metadata put marks nothing (no assignment shows metadata);
//! - every other command, a new membership and a decoded state mark every
//!   node: they are rare, and a command added later is safe by default.
//!
//! A mark is a number from one process-wide sequence, so two marks are
//! equal only if nothing was marked in between, whichever state object
//! (a decoded snapshot, a clone) holds them. Marks are not part of the
//! state's value: not serialized, equal in every comparison, and they may
//! say "changed" when nothing did (a rejected command), never the reverse.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::command::Command;
use crate::member::NodeId;
use crate::state::ClusterState;

/// The next mark of this process.
static NEXT_MARK: AtomicU64 = AtomicU64::new(1);

fn next_mark() -> u64 {
    NEXT_MARK.fetch_add(1, Ordering::Relaxed)
}

/// When each node's assignment last may have changed; see the module docs.
#[derive(Debug, Clone)]
pub(crate) struct AssignmentMarks {
    /// The last mark of every node at once.
    all: u64,
    /// Nodes marked alone since then.
    nodes: HashMap<NodeId, u64>,
}

impl Default for AssignmentMarks {
    /// A new state object: everything may have changed.
    fn default() -> Self {
        AssignmentMarks {
            all: next_mark(),
            nodes: HashMap::new(),
        }
    }
}

/// Marks are bookkeeping, not the state's value: two states are equal
/// whatever their marks.
impl PartialEq for AssignmentMarks {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for AssignmentMarks {}

impl AssignmentMarks {
    pub(crate) fn node(&mut self, node: NodeId) {
        self.nodes.insert(node, next_mark());
    }

    pub(crate) fn everyone(&mut self) {
        self.all = next_mark();
        self.nodes.clear();
    }

    fn of(&self, node: NodeId) -> u64 {
        self.nodes
            .get(&node)
            .map_or(self.all, |n| (*n).max(self.all))
    }
}

impl ClusterState {
    /// A number that changes whenever the assignment of `node` (its VMs,
    /// their leases and user data, its agent status, the policy wanted for
    /// it, the roles granted, the members) may have changed: equal marks
    /// mean the assignment is the same. See the module docs.
    pub fn assignment_mark(&self, node: NodeId) -> u64 {
        self.marks.of(node)
    }

    /// Marks what `cmd`, about to be applied, may change beyond the VM
    /// records (which mark themselves when stored or removed).
    pub(crate) fn mark_for(&mut self, cmd: &Command) {
        match cmd {
            Command::PutMeta { .. }
            | Command::PutVm { .. }
            | Command::DeleteVm { .. }
            | Command::CreateVm { .. }
            | Command::CreateVmWithData { .. }
            | Command::SetVmDesired { .. }
            | Command::ReportVm { .. }
            | Command::MigrateVm { .. } => {}
            Command::SetAgentStatus { node_id, .. } => self.marks.node(*node_id),
            Command::RegisterAgent { node_id, .. } | Command::RemoveAgent { node_id, .. }
                if self.rollout.is_none() =>
            {
                self.marks.node(*node_id);
            }
            _ => self.marks.everyone(),
        }
    }
}
