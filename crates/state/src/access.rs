//! The access table: roles granted to keys, changed only by admins (or by
//! the first node bootstrapping the table), and the audit log of every
//! change.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use tern_protocol::PeerId;
use tern_protocol::access::Role;

use crate::command::{Rejection, Response};
use crate::state::ClusterState;

/// How many access changes the audit log keeps (oldest dropped first):
/// years of grants and revocations at any rate people make them, a few
/// hundred KiB of state at most.
pub const MAX_ACCESS_LOG: usize = 1_000;

/// Most keys the access table holds: far more operators than a cluster
/// has, and a bound on the state a compromised admin key can grow.
pub const MAX_ACCESS_KEYS: usize = 1_000;

/// One access change, as the audit log records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessEvent {
    /// Position in the log, never reused.
    pub seq: u64,
    /// When, by the proposer's clock (milliseconds since the Unix epoch).
    pub at_unix_ms: u64,
    /// Who made the change.
    pub by: PeerId,
    /// Granted (`true`) or revoked (`false`).
    pub grant: bool,
    /// The key changed.
    pub key: PeerId,
    /// The role.
    pub role: Role,
}

impl ClusterState {
    pub(crate) fn has_admin(&self) -> bool {
        self.access
            .values()
            .any(|roles| roles.contains(&Role::Admin))
    }

    pub(crate) fn change_access(&mut self, mut event: AccessEvent) -> Response {
        if self.has_admin() && self.role_of(&event.by) != Some(Role::Admin) {
            return Response::Rejected(Rejection::NotAdmin { by: event.by });
        }
        if event.grant {
            if !self.access.contains_key(&event.key) && self.access.len() >= MAX_ACCESS_KEYS {
                return Response::Rejected(Rejection::AccessFull);
            }
            self.access.entry(event.key).or_default().insert(event.role);
        } else {
            if event.role == Role::Admin {
                let admins = self
                    .access
                    .iter()
                    .filter(|(k, roles)| **k != event.key && roles.contains(&Role::Admin))
                    .count();
                let holds = self
                    .access
                    .get(&event.key)
                    .is_some_and(|roles| roles.contains(&Role::Admin));
                if holds && admins == 0 {
                    return Response::Rejected(Rejection::LastAdmin { key: event.key });
                }
            }
            if let Some(roles) = self.access.get_mut(&event.key) {
                roles.remove(&event.role);
                if roles.is_empty() {
                    self.access.remove(&event.key);
                }
            }
        }
        event.seq = self.next_access_seq;
        self.next_access_seq = self.next_access_seq.saturating_add(1);
        self.access_log.push_back(event);
        while self.access_log.len() > MAX_ACCESS_LOG {
            self.access_log.pop_front();
        }
        Response::Done
    }

    /// The strongest role granted to `key`, if any (membership aside).
    pub fn role_of(&self, key: &PeerId) -> Option<Role> {
        self.access
            .get(key)
            .and_then(|roles| roles.iter().next_back().copied())
    }

    /// The roles granted, by key.
    pub fn access(&self) -> &BTreeMap<PeerId, BTreeSet<Role>> {
        &self.access
    }

    /// The most recent access changes, oldest first.
    pub fn access_log(&self) -> impl Iterator<Item = &AccessEvent> {
        self.access_log.iter()
    }
}
