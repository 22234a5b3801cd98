//! The history of VM changes: what `Vm/Watch` serves.
//!
//! Every change to a VM record (created, a field updated, a state change,
//! removed) is a [`VmEvent`] carrying its *revision*: the Raft log index of
//! the entry whose apply made it. One entry changes at most one VM record,
//! so revisions are unique and strictly increasing along the history.
//!
//! The state keeps the most recent events in a [`VmHistory`], bounded by
//! [`MAX_VM_EVENTS`] events and [`MAX_VM_EVENT_BYTES`] of record weight
//! ([`weight`]); the oldest go first. The history is part of the
//! replicated state and of its snapshots, so it survives restarts and
//! snapshot installs and is the same on every node that applied the same
//! log. [`VmHistory::complete_after`] says from where it is whole: every
//! change with a revision above it is held, and a watch from an older
//! revision must re-list instead ([`HistoryGap`]).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::vm::VmRecord;

/// Most events the history holds. A watcher that falls this far behind
/// (or a client that was away this long) re-lists instead; 2,048 changes
/// cover minutes of a busy cluster (each VM start is three or four
/// changes) while a snapshot stays small (a record weighs a few hundred
/// bytes).
pub const MAX_VM_EVENTS: usize = 2_048;

/// Most record weight ([`weight`]) the history holds, so that a burst of
/// changes to VMs with large specs (each may be up to the request limit)
/// cannot grow the state and its snapshots without bound: 8 MiB, a few
/// thousand ordinary records.
pub const MAX_VM_EVENT_BYTES: usize = 8 * 1024 * 1024;

const _: () = assert!(MAX_VM_EVENTS >= 1);
const _: () = assert!(MAX_VM_EVENT_BYTES >= crate::limits::MAX_REQUEST_BYTES);

/// One change of one VM record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmEvent {
    /// The log index of the entry that made the change.
    pub revision: u64,
    /// The record after the change (for a removal: as it was last, with
    /// `observed` or `desired` saying why it went).
    pub vm: VmRecord,
    /// The change removed the record.
    pub deleted: bool,
}

/// A watch asked for changes from before what the history holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "revision {since} has been compacted: this node holds VM changes after revision {complete_after} only"
)]
pub struct HistoryGap {
    /// The revision asked for.
    pub since: u64,
    /// The history is whole after this revision.
    pub complete_after: u64,
}

/// What a reader gets from [`VmHistory::after`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventBatch {
    /// The first events after the revision asked for, in order.
    pub events: Vec<VmEvent>,
    /// How many events after that revision the history holds in all
    /// (`events.len()` or more).
    pub pending: usize,
    /// The revision of the last applied command: every change up to it is
    /// in the history (or compacted).
    pub revision: u64,
}

/// The bounded history of VM changes; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(from = "StoredHistory")]
pub struct VmHistory {
    /// Events, oldest first, revisions strictly increasing.
    events: VecDeque<VmEvent>,
    /// Every change with a revision above this is in `events`.
    complete_after: u64,
    /// The log index of the last command applied.
    revision: u64,
    /// The weight of `events`: derived, rebuilt on decoding.
    #[serde(skip)]
    bytes: usize,
}

/// The serialized fields of [`VmHistory`].
#[derive(Deserialize)]
struct StoredHistory {
    events: VecDeque<VmEvent>,
    complete_after: u64,
    revision: u64,
}

impl From<StoredHistory> for VmHistory {
    fn from(s: StoredHistory) -> VmHistory {
        VmHistory {
            bytes: s.events.iter().map(|e| weight(&e.vm)).sum(),
            events: s.events,
            complete_after: s.complete_after,
            revision: s.revision,
        }
    }
}

/// What a record counts against [`MAX_VM_EVENT_BYTES`]: its strings'
/// lengths plus a fixed 64 bytes for its numbers and framing (about its
/// encoded size). Part of the replicated behaviour: it decides which
/// events are dropped, so it reads only the record.
pub fn weight(vm: &VmRecord) -> usize {
    let s = &vm.spec;
    64 + vm.id.len()
        + s.name.len()
        + s.runtime.len()
        + s.kernel.len()
        + s.initrd.len()
        + s.image.len()
        + s.kernel_cmdline.len()
        + s.command.iter().map(|a| a.len() + 2).sum::<usize>()
        + vm.reason.len()
        + vm.log_path.len()
}

impl VmHistory {
    /// An empty history that is whole after `revision`: what a state read
    /// from a snapshot format without a history starts with (its earlier
    /// changes are unknown).
    pub fn starting_at(revision: u64) -> VmHistory {
        VmHistory {
            complete_after: revision,
            revision,
            ..VmHistory::default()
        }
    }

    /// The revision of the last applied command (the log index).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Every change with a revision above this is held.
    pub fn complete_after(&self) -> u64 {
        self.complete_after
    }

    /// The events held, oldest first.
    pub fn events(&self) -> impl ExactSizeIterator<Item = &VmEvent> {
        self.events.iter()
    }

    /// Marks the command at log index `index` as applied (before its
    /// changes are recorded). Indexes never go back in a Raft log; an
    /// older one (a test applying at 0) leaves the revision as it is.
    pub(crate) fn advance(&mut self, index: u64) {
        self.revision = self.revision.max(index);
    }

    /// Records a change made by the command being applied, dropping the
    /// oldest events beyond the bounds.
    pub(crate) fn record(&mut self, vm: &VmRecord, deleted: bool) {
        self.bytes += weight(vm);
        self.events.push_back(VmEvent {
            revision: self.revision,
            vm: vm.clone(),
            deleted,
        });
        while self.events.len() > MAX_VM_EVENTS
            || (self.bytes > MAX_VM_EVENT_BYTES && self.events.len() > 1)
        {
            let Some(old) = self.events.pop_front() else {
                break;
            };
            self.bytes = self.bytes.saturating_sub(weight(&old.vm));
            self.complete_after = self.complete_after.max(old.revision);
        }
    }

    /// At most `max` events with a revision above `since`, in order, and
    /// no more than `max_bytes` of [`weight`] (but at least one event, if
    /// any), with how many there are in all; [`HistoryGap`] if some of
    /// them were dropped already.
    pub fn after(
        &self,
        since: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<EventBatch, HistoryGap> {
        if since < self.complete_after {
            return Err(HistoryGap {
                since,
                complete_after: self.complete_after,
            });
        }
        let first = self.events.partition_point(|e| e.revision <= since);
        let pending = self.events.len() - first;
        let mut bytes = 0usize;
        let events = self
            .events
            .range(first..)
            .take(max)
            .enumerate()
            .take_while(|(i, e)| {
                bytes = bytes.saturating_add(weight(&e.vm));
                *i == 0 || bytes <= max_bytes
            })
            .map(|(_, e)| e.clone())
            .collect();
        Ok(EventBatch {
            events,
            pending,
            revision: self.revision,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // reason: test code; a failed unwrap is a failed test.

    use super::*;

    fn vm(n: u64, pad: usize) -> VmRecord {
        VmRecord {
            id: format!("vm-{n}"),
            reason: "x".repeat(pad),
            ..VmRecord::default()
        }
    }

    #[test]
    fn the_history_is_bounded_and_says_from_where_it_is_whole() {
        let mut h = VmHistory::default();
        for i in 1..=(MAX_VM_EVENTS as u64 + 10) {
            h.advance(i);
            h.record(&vm(i, 0), false);
        }
        assert_eq!(h.events().len(), MAX_VM_EVENTS);
        assert_eq!(h.complete_after(), 10);
        assert_eq!(h.after(9, 5, usize::MAX).unwrap_err().complete_after, 10);
        let b = h.after(10, 5, usize::MAX).unwrap();
        assert_eq!(
            b.events.iter().map(|e| e.revision).collect::<Vec<_>>(),
            [11, 12, 13, 14, 15]
        );
        assert_eq!(b.pending, MAX_VM_EVENTS);
        let last = h.after(h.revision(), 5, usize::MAX).unwrap();
        assert!(last.events.is_empty());
        assert_eq!(last.pending, 0);
    }

    #[test]
    fn heavy_records_evict_by_weight_but_one_always_stays() {
        let mut h = VmHistory::default();
        let big = MAX_VM_EVENT_BYTES / 4;
        for i in 1..=6 {
            h.advance(i);
            h.record(&vm(i, big), false);
        }
        assert!(h.events().len() < 4, "{}", h.events().len());
        assert!(h.bytes <= MAX_VM_EVENT_BYTES);
        h.advance(7);
        h.record(&vm(7, MAX_VM_EVENT_BYTES * 2), true);
        assert_eq!(h.events().len(), 1);
        assert_eq!(h.complete_after(), 6);
        // A batch holds at least one event, however heavy.
        assert_eq!(h.after(6, 10, 1).unwrap().events.len(), 1);
        // The derived weight is rebuilt on decoding.
        let back: VmHistory = postcard::from_bytes(&postcard::to_stdvec(&h).unwrap()).unwrap();
        assert_eq!(back, h);
        assert_eq!(back.bytes, h.bytes);
    }
}
