//! `Vm/Watch`: the changes of VM records as a server stream, resumable by
//! revision.
//!
//! The node serves a watch from the history of VM changes kept in the
//! applied state (`tern_state::events`), on any node, leader or follower:
//! it sends the held events with a revision above the request's
//! `from_revision` (the watch's *since*; 0 = the node's current revision,
//! "from now"), in order, then each new one as this node applies it. A
//! snapshot install or a leader change is no special case: the watch reads
//! the history again after every change of the applied state
//! ([`Consensus::changes`]) and sends what it has not sent, so each event
//! goes out once, in order, whatever moved the state.
//!
//! - **Since older than the history** (compacted): `OutOfRange`, telling
//!   the client to re-list (`tern vm list`, whose answer carries the
//!   revision it is as of) and to watch from that revision.
//! - **Since ahead of this node**: the node waits up to
//!   [`FUTURE_REVISION_WAIT`] for its state to catch up (a client resuming
//!   on a follower slightly behind the node it left), then answers
//!   `InvalidArgument` naming the field and both revisions.
//! - **Slow watchers**: a watch copies at most [`WATCH_BATCH`] events
//!   ([`WATCH_BATCH_BYTES`]) out of the state at a time, and the transport holds at most a stream
//!   window of them; nothing else is buffered per watcher. A watcher that
//!   falls more than [`MAX_WATCH_LAG`] events behind the history is cut
//!   off with `ResourceExhausted`, naming the limit and the revision to
//!   resume from. Only changes applied after the watch opened count: a
//!   watch resumed from an older revision replays what was held at its own
//!   pace. One that stops reading altogether is ended by the
//!   stream's idle bound. A send the transport is writing is never
//!   abandoned half-way: the check happens between messages.
//! - **Quiet watches** get a progress event ([`pb::VmEvent::progress`],
//!   with the current revision) every [`WATCH_PROGRESS_INTERVAL`], well
//!   inside a stream's default idle bound, so neither end takes a quiet
//!   watch for a dead one.
//! - **Shutdown**: when Raft stops on the node (it shuts down) or its
//!   state machine goes away, the watch ends with `Unavailable` naming the
//!   revision to resume from elsewhere, so a watch never holds up the
//!   transports' drain.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use tern_protocol::stream::DEFAULT_STREAM_IDLE_TIMEOUT;
use tern_protocol::{Code, Status, StreamSender, pb};
use tern_state::{EventBatch, HistoryGap, Ipv4Net, Lease, MAX_VM_EVENTS, VmEvent};
use tokio::sync::watch;

use crate::consensus::{Consensus, RaftRole, RaftStatus};

/// Most events a watch copies out of the state at once: a batch is sent
/// before the next is read, so this bounds a watcher's own memory (with
/// the stream window) and how long it holds the state's lock.
pub const WATCH_BATCH: usize = 64;

/// Most record bytes ([`tern_state::events::weight`]) a watch copies out
/// of the state at once (at least one event): with many watchers, each
/// holds at most this much beside its stream window, even when VM
/// records are large.
pub const WATCH_BATCH_BYTES: usize = 1024 * 1024;

/// How far behind the history a watcher may fall, in events not yet sent,
/// before it is cut off: a quarter of the history, so that a slow watcher
/// is told it is slow (and resumes) well before its position is
/// compacted away and it would have to re-list.
pub const MAX_WATCH_LAG: usize = MAX_VM_EVENTS / 4;

/// How long a watch whose `from_revision` is ahead of this node waits for
/// the node to apply up to it: a follower a few entries behind catches up
/// within a heartbeat or two; one further behind is the wrong node to ask.
pub const FUTURE_REVISION_WAIT: Duration = Duration::from_secs(5);

/// How often a quiet watch sends a progress event: a quarter of the
/// default idle bound, so a caller with the default bound never times out
/// on a quiet watch.
pub const WATCH_PROGRESS_INTERVAL: Duration = Duration::from_secs(15);

const _: () = assert!(WATCH_BATCH <= MAX_WATCH_LAG);
const _: () = assert!(MAX_WATCH_LAG < MAX_VM_EVENTS);
const _: () =
    assert!(WATCH_PROGRESS_INTERVAL.as_millis() * 2 <= DEFAULT_STREAM_IDLE_TIMEOUT.as_millis());

/// The bounds one watch runs under: the named constants by default;
/// tests set smaller ones to reach them with few writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchLimits {
    /// Events not yet sent beyond which a watcher is cut off
    /// ([`MAX_WATCH_LAG`]).
    pub max_lag: usize,
    /// Quiet time before a progress event ([`WATCH_PROGRESS_INTERVAL`]).
    pub progress_interval: Duration,
    /// How long a revision ahead of this node is waited for
    /// ([`FUTURE_REVISION_WAIT`]).
    pub future_wait: Duration,
}

impl Default for WatchLimits {
    fn default() -> Self {
        WatchLimits {
            max_lag: MAX_WATCH_LAG,
            progress_interval: WATCH_PROGRESS_INTERVAL,
            future_wait: FUTURE_REVISION_WAIT,
        }
    }
}

/// A VM id filter must be a well-formed VM id (or empty: every VM).
fn check_filter(vm_id: &str) -> Result<(), Status> {
    if vm_id.is_empty() {
        return Ok(());
    }
    tern_runtime::spec::check_vm_id(vm_id)
        .map_err(|why| Status::invalid_argument(format!("field `vm_id`: {vm_id:?} {why}")))
}

/// The status of a watch whose position has been compacted away.
pub fn compacted_status(gap: &HistoryGap) -> Status {
    Status::new(
        Code::OutOfRange,
        format!(
            "field `from_revision`: {gap}; re-list with `tern vm list` (Vm/List) and watch from the revision it returns"
        ),
    )
}

/// The leases of the VMs in a batch, by VM id: a VM keeps its address
/// for life, so its current lease is the one of every event of it (a
/// removed VM's events show none).
pub type BatchNetwork = BTreeMap<String, (Lease, Ipv4Net)>;

/// One event as `tern.v1.VmEvent`, with the VM's address when it has one.
pub fn to_pb_event(event: &VmEvent, network: &BatchNetwork) -> pb::VmEvent {
    pb::VmEvent {
        revision: event.revision,
        vm: Some(crate::vm::to_pb(
            &event.vm,
            network.get(&event.vm.id).copied(),
        )),
        deleted: event.deleted,
        progress: false,
    }
}

/// The next batch after `since`, its VMs' leases, and the watcher's lag:
/// the events not
/// yet sent that were applied after `opened_at` (the revision the watch
/// opened at). Catching up on what was already held when the watch
/// opened is not lagging: a watch resumed from an old revision replays
/// it at its own pace, and is measured once it is past `opened_at`.
fn read_batch(
    consensus: &dyn Consensus,
    since: u64,
    opened_at: u64,
) -> Result<(EventBatch, BatchNetwork, usize), Status> {
    consensus
        .query(|state| {
            let history = state.vm_history();
            let batch = history.after(since, WATCH_BATCH, WATCH_BATCH_BYTES)?;
            let network: BatchNetwork = batch
                .events
                .iter()
                .filter_map(|e| {
                    crate::vm::network_of(state, &e.vm.id).map(|n| (e.vm.id.clone(), n))
                })
                .collect();
            let lag = if since >= opened_at {
                batch.pending
            } else {
                history.after(opened_at, 0, 0).map_or(0, |b| b.pending)
            };
            Ok((batch, network, lag))
        })
        .map_err(|e| Status::unavailable(e.to_string()))?
        .map_err(|gap: HistoryGap| compacted_status(&gap))
}

/// Waits for the next change of the applied state; `Unavailable` naming
/// where to resume when the state machine is gone (the node stops).
async fn changed(changes: &mut watch::Receiver<u64>, last: u64) -> Result<(), Status> {
    changes.changed().await.map_err(|_| {
        Status::unavailable(format!(
            "the node is shutting down; resume the watch on another node from revision {last}"
        ))
    })
}

/// Resolves once Raft stops on this node (or its status is gone).
async fn stopping(status: &mut watch::Receiver<RaftStatus>) {
    let stopped = status
        .wait_for(|s| s.role == RaftRole::Shutdown)
        .await
        .map(|_| ());
    drop(stopped);
}

/// The revision this node has applied up to.
fn current(consensus: &dyn Consensus) -> Result<u64, Status> {
    consensus
        .query(|state| state.vm_history().revision())
        .map_err(|e| Status::unavailable(e.to_string()))
}

/// A revision ahead of this node: waits (at most `wait`) for the node to
/// catch up, then refuses it naming `from_revision`.
async fn wait_for_revision(
    consensus: &dyn Consensus,
    changes: &mut watch::Receiver<u64>,
    revision: u64,
    wait: std::time::Duration,
) -> Result<(), Status> {
    if current(consensus)? >= revision {
        return Ok(());
    }
    let caught_up = tokio::time::timeout(wait, async {
        loop {
            changed(changes, revision).await?;
            if current(consensus)? >= revision {
                return Ok::<(), Status>(());
            }
        }
    })
    .await;
    match caught_up {
        Ok(result) => result,
        Err(_) => Err(Status::invalid_argument(format!(
            "field `from_revision`: revision {revision} is ahead of this node's applied revision {} (waited {wait:?}); \
             give a revision from `tern vm list` or from an event this cluster sent",
            current(consensus)?,
        ))),
    }
}

/// Serves one watch; see the module docs.
pub async fn serve(
    consensus: Arc<dyn Consensus>,
    limits: WatchLimits,
    request: Bytes,
    mut outbound: StreamSender,
) -> Result<(), Status> {
    let req = pb::WatchVmsRequest::decode(request.as_ref())
        .map_err(|e| Status::invalid_argument(format!("undecodable WatchVmsRequest: {e}")))?;
    check_filter(&req.vm_id)?;
    // Subscribed before the first read: a change after it wakes the loop.
    let mut changes = consensus.changes();
    let mut status = consensus.status();
    let mut last = if req.from_revision == 0 {
        current(&*consensus)?
    } else {
        req.from_revision
    };
    wait_for_revision(&*consensus, &mut changes, last, limits.future_wait).await?;
    let opened_at = current(&*consensus)?;
    tracing::debug!(since = last, opened_at, vm_id = %req.vm_id, "VM watch opened");
    loop {
        let (batch, network, lag) = read_batch(&*consensus, last, opened_at)?;
        if lag > limits.max_lag {
            tracing::info!(lag, last, "a slow VM watcher was cut off");
            return Err(Status::new(
                Code::ResourceExhausted,
                format!(
                    "the watcher fell {lag} events behind, more than the limit of {} (MAX_WATCH_LAG); \
                     it was cut off: resume from revision {last}, the last one it was sent",
                    limits.max_lag
                ),
            ));
        }
        if batch.events.is_empty() {
            // Nothing new: wait for a change, or say we are alive.
            tokio::select! {
                r = changed(&mut changes, last) => r?,
                () = stopping(&mut status) => {
                    return Err(Status::unavailable(format!(
                        "Raft is stopping on this node; resume the watch on another node from revision {last}"
                    )));
                }
                () = tokio::time::sleep(limits.progress_interval) => {
                    // Every change up to the batch's revision has been sent.
                    last = last.max(batch.revision);
                    let progress = pb::VmEvent {
                        revision: last,
                        progress: true,
                        ..pb::VmEvent::default()
                    };
                    send(&mut outbound, &progress, last).await?;
                }
            }
            continue;
        }
        for event in &batch.events {
            if req.vm_id.is_empty() || event.vm.id == req.vm_id {
                send(&mut outbound, &to_pb_event(event, &network), last).await?;
            }
            last = event.revision;
        }
    }
}

async fn send(outbound: &mut StreamSender, event: &pb::VmEvent, last: u64) -> Result<(), Status> {
    outbound
        .send(event.encode_to_vec().into())
        .await
        .map_err(|e| {
            // The caller is gone or stopped reading past the idle bound;
            // the status is for the log, the caller may not see it.
            tracing::debug!(error = %e, last, "VM watch ended by its caller");
            Status::unavailable(format!(
                "the watch could not send (resume from revision {last}): {e}"
            ))
        })
}
