//! Wakes an agent's assignment stream only when its assignment may have
//! changed.
//!
//! Each server streams the assignments of the agents connected to it
//! (`Cluster/AgentSync`, in [`crate::agents`]). If every stream followed
//! the state machine's changes itself, each applied write would wake all
//! of them, and each would read the state (under the lock the apply
//! takes) to find, almost always, that nothing of its agent changed: work
//! and lock traffic on every commit that grow with the agents, which is
//! what slowed commits at 1,000 agents. Instead one task per server (the
//! *hub*) follows the changes, waits [`SYNC_COALESCE`] so a burst costs
//! one look, compares every connected agent's
//! [`assignment_mark`](tern_state::ClusterState::assignment_mark) with
//! the one its stream last read, all in one read of the state, and wakes
//! only the streams whose mark moved. A write that concerns one agent
//! wakes one stream; a metadata put wakes none.
//!
//! A subscription also counts the agent's streams on this server (at most
//! [`MAX_SYNC_STREAMS_PER_AGENT`]).
//!
//! The hub runs while streams are open: the first subscription starts it,
//! and it ends when it finds none left, or when the node's state machine
//! goes (then every subscription's wake-up channel closes, and the
//! streams end telling their agents to resume elsewhere).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tern_protocol::{Code, Status};
use tern_raft_net::Attached;
use tern_state::NodeId;
use tokio::sync::watch;

use crate::agents::MAX_SYNC_STREAMS_PER_AGENT;
use crate::service::{ClusterShared, lock};

/// How long the hub waits after a change before it looks: a burst of
/// writes costs one look, not one per write. Small next to a heartbeat
/// interval; it bounds how much later than the commit an agent can learn
/// of a change.
pub const SYNC_COALESCE: Duration = Duration::from_millis(20);

/// The streams a server's hub wakes.
#[derive(Debug, Default)]
pub(crate) struct AssignmentHub {
    inner: Mutex<Hub>,
}

#[derive(Debug, Default)]
struct Hub {
    /// Whether the hub task runs.
    running: bool,
    next_id: u64,
    streams: HashMap<u64, Subscriber>,
}

#[derive(Debug)]
struct Subscriber {
    agent: NodeId,
    /// The mark the stream last read (or the hub last woke it for).
    mark: u64,
    wake: watch::Sender<()>,
}

/// One stream's place in the hub; leaves it when dropped.
pub(crate) struct Subscription {
    shared: Arc<ClusterShared>,
    id: u64,
    /// Changes when the agent's assignment may have changed; closed when
    /// the node's state machine is gone.
    pub(crate) woken: watch::Receiver<()>,
}

impl Subscription {
    /// Subscribes `agent`'s stream on this server; `ResourceExhausted`
    /// when it already holds [`MAX_SYNC_STREAMS_PER_AGENT`] here.
    pub(crate) fn open(shared: &Arc<ClusterShared>, agent: NodeId) -> Result<Subscription, Status> {
        let (wake, woken) = watch::channel(());
        let mut hub = lock(&shared.assignments.inner);
        let open = hub.streams.values().filter(|s| s.agent == agent).count();
        if open >= MAX_SYNC_STREAMS_PER_AGENT {
            return Err(Status::new(
                Code::ResourceExhausted,
                format!(
                    "agent {agent} already holds {MAX_SYNC_STREAMS_PER_AGENT} assignment streams on this server; close one first"
                ),
            ));
        }
        let id = hub.next_id;
        hub.next_id += 1;
        hub.streams.insert(
            id,
            Subscriber {
                agent,
                mark: 0,
                wake,
            },
        );
        Ok(Subscription {
            shared: shared.clone(),
            id,
            woken,
        })
    }

    /// Starts the hub over `node`'s state if it is not running.
    pub(crate) fn follow(&self, node: &Arc<Attached>) {
        let mut hub = lock(&self.shared.assignments.inner);
        if !hub.running {
            hub.running = true;
            let changes = node.sm.changes();
            tokio::spawn(run(self.shared.clone(), Arc::downgrade(node), changes));
        }
    }

    /// The stream read its assignment at `mark`.
    pub(crate) fn read_at(&self, mark: u64) {
        if let Some(s) = lock(&self.shared.assignments.inner)
            .streams
            .get_mut(&self.id)
        {
            s.mark = mark;
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        lock(&self.shared.assignments.inner)
            .streams
            .remove(&self.id);
    }
}

/// The hub: see the module docs.
async fn run(shared: Arc<ClusterShared>, node: Weak<Attached>, mut changes: watch::Receiver<u64>) {
    loop {
        let open = changes.changed().await.is_ok();
        if open {
            tokio::time::sleep(SYNC_COALESCE).await;
        }
        let node = node.upgrade().filter(|_| open);
        let agents: Vec<(u64, NodeId)> = {
            let mut hub = lock(&shared.assignments.inner);
            if hub.streams.is_empty() || node.is_none() {
                hub.running = false;
                // Closing every wake-up channel ends the streams: the
                // state they follow is gone.
                if node.is_none() {
                    hub.streams.clear();
                }
                return;
            }
            hub.streams.iter().map(|(id, s)| (*id, s.agent)).collect()
        };
        let Some(node) = node else { return };
        let Ok(marks) = node.sm.read(|s| {
            agents
                .iter()
                .map(|(id, agent)| (*id, s.assignment_mark(*agent)))
                .collect::<Vec<_>>()
        }) else {
            continue;
        };
        drop(node);
        let mut hub = lock(&shared.assignments.inner);
        for (id, mark) in marks {
            if let Some(s) = hub.streams.get_mut(&id)
                && s.mark != mark
            {
                s.mark = mark;
                s.wake.send_replace(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_holds_at_most_two_assignment_streams_per_server() {
        let shared = crate::RaftServices::new(None).shared_arc();
        let one = Subscription::open(&shared, 5).expect("first");
        let two = Subscription::open(&shared, 5).expect("a reconnect overlapping the first");
        let refused = Subscription::open(&shared, 5).err().expect("a third");
        assert_eq!(refused.code, Code::ResourceExhausted);
        assert!(Subscription::open(&shared, 6).is_ok(), "per agent");
        drop(one);
        let three = Subscription::open(&shared, 5).expect("a closed stream frees its place");
        drop((two, three));
        assert!(
            lock(&shared.assignments.inner)
                .streams
                .values()
                .all(|s| s.agent != 5)
        );
    }
}
