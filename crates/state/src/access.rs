//! The access table: roles granted to keys, changed only by admins (or by
//! the first node bootstrapping the table), and the audit log of every
//! access, join-token and membership change.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use tern_protocol::PeerId;
use tern_protocol::access::Role;

use crate::admission::MembershipChange;
use crate::command::{Rejection, Response};
use crate::member::NodeId;
use crate::state::ClusterState;

/// How many changes the audit log keeps (oldest dropped first): years of
/// grants, tokens and membership changes at any rate people make them, a
/// few hundred KiB of state at most.
pub const MAX_AUDIT_LOG: usize = 1_000;

/// Most keys the access table holds: far more operators than a cluster
/// has, and a bound on the state a compromised admin key can grow.
pub const MAX_ACCESS_KEYS: usize = 1_000;

/// One access change, as format 3 snapshots recorded it (read when
/// upgrading; see [`AuditEvent`]).
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

impl From<AccessEvent> for AuditEvent {
    fn from(e: AccessEvent) -> AuditEvent {
        AuditEvent {
            seq: e.seq,
            at_unix_ms: e.at_unix_ms,
            by: e.by,
            action: if e.grant {
                AuditAction::Grant {
                    key: e.key,
                    role: e.role,
                }
            } else {
                AuditAction::Revoke {
                    key: e.key,
                    role: e.role,
                }
            },
        }
    }
}

/// One change, as the audit log records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Position in the log, never reused.
    pub seq: u64,
    /// When, by the proposer's clock (milliseconds since the Unix epoch).
    pub at_unix_ms: u64,
    /// Who made the change (for an admission, the joiner's own key).
    pub by: PeerId,
    /// What changed.
    pub action: AuditAction,
}

/// What an audit event records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuditAction {
    /// A role granted to a key.
    Grant {
        /// The key.
        key: PeerId,
        /// The role.
        role: Role,
    },
    /// A role revoked from a key.
    Revoke {
        /// The key.
        key: PeerId,
        /// The role.
        role: Role,
    },
    /// A join token created.
    TokenCreated {
        /// Its public id.
        id: String,
        /// When it expires (milliseconds since the Unix epoch).
        expires_at_unix_ms: u64,
        /// Uses it allows (`None`: until it expires).
        uses: Option<u32>,
    },
    /// A join token revoked.
    TokenRevoked {
        /// Its public id.
        id: String,
    },
    /// A node admitted with a join token (given its node id).
    Admitted {
        /// The token's public id.
        token_id: String,
        /// The node id it got.
        node_id: NodeId,
    },
    /// A change of the membership, made by the leader.
    Membership(MembershipChange),
}

impl AuditAction {
    /// A short name for tables and JSON: `grant`, `revoke`, `token-create`,
    /// `token-revoke`, `admit`, `add-learner`, `promote`, `remove`,
    /// `demote`.
    pub fn name(&self) -> &'static str {
        match self {
            AuditAction::Grant { .. } => "grant",
            AuditAction::Revoke { .. } => "revoke",
            AuditAction::TokenCreated { .. } => "token-create",
            AuditAction::TokenRevoked { .. } => "token-revoke",
            AuditAction::Admitted { .. } => "admit",
            AuditAction::Membership(MembershipChange::AddedLearner { .. }) => "add-learner",
            AuditAction::Membership(MembershipChange::Promoted { .. }) => "promote",
            AuditAction::Membership(MembershipChange::Removed { .. }) => "remove",
            AuditAction::Membership(MembershipChange::Demoted { .. }) => "demote",
        }
    }

    /// The key the change is about, if it is about one.
    pub fn key(&self) -> Option<PeerId> {
        match self {
            AuditAction::Grant { key, .. } | AuditAction::Revoke { key, .. } => Some(*key),
            AuditAction::Membership(MembershipChange::AddedLearner { peer, .. }) => Some(*peer),
            _ => None,
        }
    }

    /// The role, for grants and revocations.
    pub fn role(&self) -> Option<Role> {
        match self {
            AuditAction::Grant { role, .. } | AuditAction::Revoke { role, .. } => Some(*role),
            _ => None,
        }
    }

    /// The node id, for admissions and membership changes.
    pub fn node_id(&self) -> Option<NodeId> {
        match self {
            AuditAction::Admitted { node_id, .. }
            | AuditAction::Membership(
                MembershipChange::AddedLearner { node_id, .. }
                | MembershipChange::Promoted { node_id }
                | MembershipChange::Removed { node_id }
                | MembershipChange::Demoted { node_id },
            ) => Some(*node_id),
            _ => None,
        }
    }

    /// The join token's public id, for token events and admissions.
    pub fn token_id(&self) -> Option<&str> {
        match self {
            AuditAction::TokenCreated { id, .. } | AuditAction::TokenRevoked { id } => Some(id),
            AuditAction::Admitted { token_id, .. } => Some(token_id),
            _ => None,
        }
    }
}

impl ClusterState {
    pub(crate) fn has_admin(&self) -> bool {
        self.access
            .values()
            .any(|roles| roles.contains(&Role::Admin))
    }

    pub(crate) fn change_access(
        &mut self,
        grant: bool,
        key: PeerId,
        role: Role,
        by: PeerId,
        at_unix_ms: u64,
    ) -> Response {
        if self.has_admin() && self.role_of(&by) != Some(Role::Admin) {
            return Response::Rejected(Rejection::NotAdmin { by });
        }
        if grant {
            if !self.access.contains_key(&key) && self.access.len() >= MAX_ACCESS_KEYS {
                return Response::Rejected(Rejection::AccessFull);
            }
            self.access.entry(key).or_default().insert(role);
        } else {
            if role == Role::Admin {
                let admins = self
                    .access
                    .iter()
                    .filter(|(k, roles)| **k != key && roles.contains(&Role::Admin))
                    .count();
                let holds = self
                    .access
                    .get(&key)
                    .is_some_and(|roles| roles.contains(&Role::Admin));
                if holds && admins == 0 {
                    return Response::Rejected(Rejection::LastAdmin { key });
                }
            }
            if let Some(roles) = self.access.get_mut(&key) {
                roles.remove(&role);
                if roles.is_empty() {
                    self.access.remove(&key);
                }
            }
        }
        let action = if grant {
            AuditAction::Grant { key, role }
        } else {
            AuditAction::Revoke { key, role }
        };
        self.audit(at_unix_ms, by, action);
        Response::Done
    }

    /// Appends an event to the audit log, dropping the oldest beyond
    /// [`MAX_AUDIT_LOG`].
    pub(crate) fn audit(&mut self, at_unix_ms: u64, by: PeerId, action: AuditAction) {
        let seq = self.next_audit_seq;
        self.next_audit_seq = self.next_audit_seq.saturating_add(1);
        self.audit_log.push_back(AuditEvent {
            seq,
            at_unix_ms,
            by,
            action,
        });
        while self.audit_log.len() > MAX_AUDIT_LOG {
            self.audit_log.pop_front();
        }
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

    /// The most recent access, token and membership changes, oldest
    /// first.
    pub fn audit_log(&self) -> impl Iterator<Item = &AuditEvent> {
        self.audit_log.iter()
    }
}
