//! Per-peer, per-lane bounded admission for outgoing Raft calls.
//!
//! Every target node has its own [`PeerGate`] with one semaphore per lane
//! (control, replication, bulk) and a bound on how many callers may wait
//! for it. A caller that finds the queue full, or whose deadline passes
//! while it waits, is refused at once; the network maps that to
//! `Unreachable`, so openraft backs off from that peer alone. A slow or
//! dead peer therefore fills only its own gate and never delays calls to
//! the others; and since the gates are separate per lane, a snapshot
//! transfer never holds up a heartbeat to the same peer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tern_protocol::{PeerId, Priority};
use tern_state::NodeId;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Control calls (votes, heartbeats, leadership transfer) in flight to one
/// peer. openraft sends one heartbeat at a time per peer plus election
/// traffic; a few more absorb a burst after a leader change.
pub const CONTROL_IN_FLIGHT_PER_PEER: usize = 8;
/// Replication calls open to one peer: a `Raft/AppendStream` stream
/// holds one place while it is open (its batches are bounded by
/// `append_stream::MAX_APPEND_IN_FLIGHT`), a unary append one while it
/// waits. openraft keeps one replication stream per follower; two leave
/// room for a stream being replaced while the old one winds down.
pub const REPLICATION_IN_FLIGHT_PER_PEER: usize = 2;
/// Snapshot chunks in flight to one peer: one transfer, one chunk at a
/// time (chunks are written in order on the receiver).
pub const BULK_IN_FLIGHT_PER_PEER: usize = 1;
/// Callers allowed to wait for a lane of one peer before new ones are
/// refused: enough to ride out one slow call, small enough that a dead
/// peer cannot pile up work.
pub const QUEUE_PER_LANE: usize = 16;
/// Distinct peers remembered before gates nobody uses are dropped. A
/// cluster has a handful of members; the bound only guards against churn.
pub const MAX_TRACKED_PEERS: usize = 1024;

/// Why a call was refused before it was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Too many callers already wait for this peer's lane.
    QueueFull,
    /// The deadline passed while waiting.
    TimedOut,
}

/// One lane's bound: permits for calls in flight, a counter of waiters.
#[derive(Debug)]
struct Lane {
    permits: Arc<Semaphore>,
    waiting: AtomicUsize,
}

impl Lane {
    fn new(in_flight: usize) -> Lane {
        Lane {
            permits: Arc::new(Semaphore::new(in_flight)),
            waiting: AtomicUsize::new(0),
        }
    }

    async fn admit(&self, wait: Duration) -> Result<OwnedSemaphorePermit, Refused> {
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Ok(permit);
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= QUEUE_PER_LANE {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::QueueFull);
        }
        let result = tokio::time::timeout(wait, self.permits.clone().acquire_owned()).await;
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        match result {
            Ok(Ok(permit)) => Ok(permit),
            // The semaphore is never closed; treat it as a timeout anyway.
            Ok(Err(_)) | Err(_) => Err(Refused::TimedOut),
        }
    }
}

/// The lanes of one peer.
#[derive(Debug)]
pub struct PeerGate {
    control: Lane,
    replication: Lane,
    bulk: Lane,
}

impl PeerGate {
    fn new() -> PeerGate {
        PeerGate {
            control: Lane::new(CONTROL_IN_FLIGHT_PER_PEER),
            replication: Lane::new(REPLICATION_IN_FLIGHT_PER_PEER),
            bulk: Lane::new(BULK_IN_FLIGHT_PER_PEER),
        }
    }

    /// Waits at most `wait` for room in `lane`; the permit is held for the
    /// call. `Normal` traffic shares the replication lane.
    pub async fn admit(
        &self,
        lane: Priority,
        wait: Duration,
    ) -> Result<OwnedSemaphorePermit, Refused> {
        match lane {
            Priority::Control => self.control.admit(wait).await,
            Priority::Replication | Priority::Normal => self.replication.admit(wait).await,
            Priority::Bulk => self.bulk.admit(wait).await,
        }
    }
}

/// The gates of every peer this node calls.
#[derive(Debug, Default)]
pub struct Gates {
    peers: Mutex<HashMap<(NodeId, PeerId), Arc<PeerGate>>>,
}

impl Gates {
    /// The gate of `node` (created on first use).
    pub fn get(&self, node: NodeId, peer: PeerId) -> Arc<PeerGate> {
        let mut peers = match self.peers.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if peers.len() >= MAX_TRACKED_PEERS && !peers.contains_key(&(node, peer)) {
            peers.retain(|_, gate| Arc::strong_count(gate) > 1);
        }
        peers
            .entry((node, peer))
            .or_insert_with(|| Arc::new(PeerGate::new()))
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_full_lane_refuses_without_touching_other_lanes_or_peers() {
        let gates = Gates::default();
        let slow = gates.get(1, PeerId::from_bytes([1; 32]));
        let _held = slow
            .admit(Priority::Bulk, Duration::from_secs(1))
            .await
            .unwrap();
        // The bulk lane is busy: a waiter times out...
        assert_eq!(
            slow.admit(Priority::Bulk, Duration::from_millis(10))
                .await
                .err(),
            Some(Refused::TimedOut)
        );
        // ...but control to the same peer, and bulk to another, go at once.
        let _control = slow.admit(Priority::Control, Duration::ZERO).await.unwrap();
        let other = gates.get(2, PeerId::from_bytes([2; 32]));
        let _bulk = other.admit(Priority::Bulk, Duration::ZERO).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_beyond_the_queue_bound_are_refused() {
        let gate = Arc::new(PeerGate::new());
        let mut held = Vec::new();
        for _ in 0..REPLICATION_IN_FLIGHT_PER_PEER {
            held.push(
                gate.admit(Priority::Replication, Duration::ZERO)
                    .await
                    .unwrap(),
            );
        }
        let mut waiters = Vec::new();
        for _ in 0..QUEUE_PER_LANE {
            let gate = gate.clone();
            waiters.push(tokio::spawn(async move {
                gate.admit(Priority::Replication, Duration::from_secs(60))
                    .await
                    .is_ok()
            }));
        }
        tokio::task::yield_now().await;
        while gate.replication.waiting.load(Ordering::Acquire) < QUEUE_PER_LANE {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            gate.admit(Priority::Replication, Duration::from_secs(60))
                .await
                .err(),
            Some(Refused::QueueFull)
        );
        drop(held);
        for w in waiters {
            assert!(w.await.unwrap());
        }
    }
}
