//! Admission: the join tokens an admin hands out, and the audit records of
//! membership changes.
//!
//! A join token is created by an admin (`tern cluster token create`), has
//! a short public id and a secret; the state keeps only a hash of the
//! secret (computed by the leader, so this crate needs no hash function
//! and `apply` stays pure), when it expires and how many uses are left.
//! [`Command::AdmitNode`](crate::command::Command::AdmitNode) spends one use and allocates the joiner's node id
//! in one step: a token past its expiry (by the proposer's clock, a value
//! in the command), used up, revoked or with another hash admits nobody.
//! Expired tokens are dropped when the next token command applies, so the
//! table stays small; used-up ones stay until they expire (a reuse is told
//! so) or are revoked.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tern_protocol::PeerId;
use tern_protocol::access::Role;

use crate::access::AuditAction;
use crate::command::{Rejection, Response};
use crate::member::NodeId;
use crate::state::ClusterState;

/// Most join tokens alive at once: enough for every rollout wave and
/// automation an operator runs in parallel, and a bound on the state an
/// admin key can grow.
pub const MAX_JOIN_TOKENS: usize = 64;

/// Longest lifetime of a join token (7 days): a token is for joining
/// nodes now, not a standing credential.
pub const MAX_TOKEN_TTL_MS: u64 = 7 * 24 * 3600 * 1000;

/// Most uses one token may allow: a fleet's wave, not a standing
/// credential.
pub const MAX_TOKEN_USES: u32 = 10_000;

/// Length of a token's public id, in characters (lowercase hex).
pub const TOKEN_ID_LEN: usize = 8;

/// Length of the hash of a token's secret, in bytes.
pub const TOKEN_HASH_LEN: usize = 32;

/// A join token as the state keeps it (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenRecord {
    /// Public id: [`TOKEN_ID_LEN`] lowercase hex characters.
    pub id: String,
    /// Hash of the secret (the leader's keyed hash; see `tern-cluster`).
    pub hash: [u8; TOKEN_HASH_LEN],
    /// The admin who created it.
    pub created_by: PeerId,
    /// When, by the proposer's clock (milliseconds since the Unix epoch).
    pub created_at_unix_ms: u64,
    /// When it stops admitting (milliseconds since the Unix epoch).
    pub expires_at_unix_ms: u64,
    /// Uses left; `None` for as many as arrive before it expires.
    pub uses_left: Option<u32>,
    /// Nodes admitted with it so far.
    pub used: u32,
}

impl JoinTokenRecord {
    /// Whether it still admits at `now_unix_ms`.
    pub fn is_live(&self, now_unix_ms: u64) -> bool {
        now_unix_ms < self.expires_at_unix_ms && self.uses_left != Some(0)
    }
}

/// Whether `id` is a well-formed token id.
pub fn valid_token_id(id: &str) -> bool {
    id.len() == TOKEN_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl ClusterState {
    /// The join tokens, by id (live or not yet swept).
    pub fn join_tokens(&self) -> &BTreeMap<String, JoinTokenRecord> {
        &self.tokens
    }

    /// Drops tokens expired at `now_unix_ms`. Used-up tokens stay until
    /// they expire, so that a joiner reusing one is told so.
    fn sweep_tokens(&mut self, now_unix_ms: u64) {
        self.tokens
            .retain(|_, t| now_unix_ms < t.expires_at_unix_ms);
    }

    /// Applies [`Command::CreateJoinToken`].
    pub(crate) fn create_join_token(&mut self, token: JoinTokenRecord) -> Response {
        if self.role_of(&token.created_by) != Some(Role::Admin) {
            return Response::Rejected(Rejection::NotAdmin {
                by: token.created_by,
            });
        }
        if !valid_token_id(&token.id) {
            return Response::Rejected(Rejection::InvalidToken {
                why: format!(
                    "token id {:?} is not {TOKEN_ID_LEN} lowercase hex characters",
                    token.id
                ),
            });
        }
        let ttl = token
            .expires_at_unix_ms
            .saturating_sub(token.created_at_unix_ms);
        if ttl == 0 || ttl > MAX_TOKEN_TTL_MS {
            return Response::Rejected(Rejection::InvalidToken {
                why: format!(
                    "a token lives 1 ms to {} hours; this one {ttl} ms",
                    MAX_TOKEN_TTL_MS / 3_600_000
                ),
            });
        }
        if token
            .uses_left
            .is_some_and(|n| n == 0 || n > MAX_TOKEN_USES)
            || token.used != 0
        {
            return Response::Rejected(Rejection::InvalidToken {
                why: format!("a token allows 1 to {MAX_TOKEN_USES} uses"),
            });
        }
        self.sweep_tokens(token.created_at_unix_ms);
        if self.tokens.contains_key(&token.id) {
            return Response::Rejected(Rejection::InvalidToken {
                why: format!("a token with id {} exists", token.id),
            });
        }
        if self.tokens.len() >= MAX_JOIN_TOKENS {
            return Response::Rejected(Rejection::TokensFull);
        }
        self.audit(
            token.created_at_unix_ms,
            token.created_by,
            AuditAction::TokenCreated {
                id: token.id.clone(),
                expires_at_unix_ms: token.expires_at_unix_ms,
                uses: token.uses_left,
            },
        );
        self.tokens.insert(token.id.clone(), token);
        Response::Done
    }

    /// Applies [`Command::RevokeJoinToken`].
    pub(crate) fn revoke_join_token(
        &mut self,
        id: String,
        by: PeerId,
        at_unix_ms: u64,
    ) -> Response {
        if self.role_of(&by) != Some(Role::Admin) {
            return Response::Rejected(Rejection::NotAdmin { by });
        }
        self.sweep_tokens(at_unix_ms);
        if self.tokens.remove(&id).is_none() {
            return Response::Rejected(Rejection::UnknownToken { id });
        }
        self.audit(at_unix_ms, by, AuditAction::TokenRevoked { id });
        Response::Done
    }

    /// Applies [`Command::AdmitNode`]: spends one use of the token and
    /// allocates `peer`'s node id.
    pub(crate) fn admit_node(
        &mut self,
        peer: PeerId,
        token_id: String,
        token_hash: [u8; TOKEN_HASH_LEN],
        at_unix_ms: u64,
    ) -> Response {
        let Some(token) = self.tokens.get(&token_id) else {
            return Response::Rejected(Rejection::UnknownToken { id: token_id });
        };
        // Constant time is the leader's job (it compares before proposing);
        // here the hash is already in the log.
        if token.hash != token_hash {
            return Response::Rejected(Rejection::UnknownToken { id: token_id });
        }
        if at_unix_ms >= token.expires_at_unix_ms {
            return Response::Rejected(Rejection::TokenExpired { id: token_id });
        }
        if token.uses_left == Some(0) {
            return Response::Rejected(Rejection::TokenUsedUp { id: token_id });
        }
        let node_id = match self.allocate_node_id(peer) {
            Response::NodeId(id) => id,
            other => return other,
        };
        if let Some(token) = self.tokens.get_mut(&token_id) {
            token.used = token.used.saturating_add(1);
            if let Some(left) = token.uses_left.as_mut() {
                *left -= 1;
            }
        }
        self.audit(
            at_unix_ms,
            peer,
            AuditAction::Admitted { token_id, node_id },
        );
        Response::NodeId(node_id)
    }

    /// Applies [`Command::RecordMembership`]: an audit record of a change
    /// the leader made to the membership.
    pub(crate) fn record_membership(
        &mut self,
        change: MembershipChange,
        by: PeerId,
        at_unix_ms: u64,
    ) -> Response {
        self.audit(at_unix_ms, by, AuditAction::Membership(change));
        Response::Done
    }
}

/// A membership change, as the audit log records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MembershipChange {
    /// A node was added as a learner.
    AddedLearner {
        /// Its node id.
        node_id: NodeId,
        /// Its key.
        peer: PeerId,
    },
    /// A learner became a voter.
    Promoted {
        /// Its node id.
        node_id: NodeId,
    },
    /// A node left or was removed.
    Removed {
        /// Its node id.
        node_id: NodeId,
    },
    /// A server was demoted to an agent: it left the membership keeping
    /// its node id and its VMs.
    Demoted {
        /// Its node id.
        node_id: NodeId,
    },
}

impl std::fmt::Display for MembershipChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MembershipChange::AddedLearner { node_id, peer } => {
                write!(f, "node {node_id} ({}) added as a learner", peer.short())
            }
            MembershipChange::Promoted { node_id } => write!(f, "node {node_id} promoted to voter"),
            MembershipChange::Removed { node_id } => write!(f, "node {node_id} removed"),
            MembershipChange::Demoted { node_id } => {
                write!(f, "node {node_id} demoted from server to agent")
            }
        }
    }
}
