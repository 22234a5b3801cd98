//! Request-id deduplication: a write retried with the same request id is
//! answered with the first write's response and changes nothing, once for
//! every command that carries one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::command::{RequestId, Response};
use crate::state::ClusterState;

/// How many recent request ids the deduplication table remembers. A client
/// retry arrives within seconds; this many writes take far longer than that
/// at any write rate the cluster state sees, and at most a few MiB of
/// memory.
pub const MAX_DEDUP_ENTRIES: usize = 16_384;

/// One remembered request: when it was applied and what it answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Remembered {
    seq: u64,
    response: Response,
}

/// Recent request ids and their responses, oldest evicted first once
/// [`MAX_DEDUP_ENTRIES`] are held.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DedupTable {
    pub(crate) by_id: BTreeMap<RequestId, Remembered>,
    /// Application order, for eviction.
    pub(crate) order: BTreeMap<u64, RequestId>,
    next_seq: u64,
}

impl DedupTable {
    pub(crate) fn get(&self, id: &str) -> Option<&Response> {
        self.by_id.get(id).map(|r| &r.response)
    }

    pub(crate) fn remember(&mut self, id: RequestId, response: Response) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.order.insert(seq, id.clone());
        if let Some(old) = self.by_id.insert(id, Remembered { seq, response }) {
            self.order.remove(&old.seq);
        }
        while self.by_id.len() > MAX_DEDUP_ENTRIES {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            self.by_id.remove(&oldest);
        }
    }
}

impl ClusterState {
    /// The response remembered for a request id, if it is still
    /// remembered.
    pub fn remembered_response(&self, request_id: &str) -> Option<&Response> {
        self.dedup.get(request_id)
    }
}
