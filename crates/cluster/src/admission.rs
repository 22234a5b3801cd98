//! Admission: join tokens (`Cluster/TokenCreate`, `TokenRevoke`,
//! `TokenList`), checking the token a joiner presents, the bound on failed
//! join attempts, and the admission settings ([`Admission`]).
//!
//! A token is `ID.SECRET`: an 8-hex-digit public id and a 256-bit random
//! secret (64 hex digits), made by the leader with `rand`'s thread RNG (a
//! CSPRNG seeded and reseeded from the OS).
//! The cluster state keeps the id, a hash of the secret (BLAKE3 in key
//! derivation mode, context [`TOKEN_HASH_CONTEXT`]), its expiry and uses;
//! the secret appears once, in the answer to `TokenCreate`. A joiner's
//! token is checked against the state by the node that serves the join
//! (hashes compared in constant time) and again by `apply`, which spends
//! the use atomically with the node-id allocation.
//!
//! Failed attempts (an unknown, mistyped, expired or used-up token) are
//! bounded per calling key and in total per window
//! ([`FAILED_JOINS_PER_KEY`], [`FAILED_JOINS_TOTAL`]): beyond them a
//! join without membership is answered `ResourceExhausted` before any
//! token is looked at, so guessing is slow even with fresh keys.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use prost::Message;
use rand::RngCore;
use tern_protocol::access::Role;
use tern_protocol::metric_names::JOIN_REFUSED;
use tern_protocol::{Code, PeerId, RequestContext, Status, pb};
use tern_raft_net::Attached;
use tern_state::admission::{
    MAX_TOKEN_TTL_MS, MAX_TOKEN_USES, TOKEN_HASH_LEN, TOKEN_ID_LEN, valid_token_id,
};
use tern_state::{Capacity, Command, JoinTokenRecord, MAX_REQUEST_ID_LEN, Rejection, Response};
use tokio::time::Instant;

use crate::membership::JoinToken;
use crate::node::WriteError;

/// Failed join attempts one key may make per [`FAILED_JOIN_WINDOW`]: a
/// mistyped token fixed by hand a few times, never a guessing rate.
pub const FAILED_JOINS_PER_KEY: u32 = 5;

/// Failed join attempts from all keys together per window: keys are free
/// to make, so this is the bound that matters against guessing; far above
/// a fleet's honest mistakes.
pub const FAILED_JOINS_TOTAL: u32 = 100;

/// The window the two bounds above count in.
pub const FAILED_JOIN_WINDOW: Duration = Duration::from_secs(60);

/// Keys whose failures are tracked at once (older windows are dropped
/// first; when all are current, the total bound alone applies).
pub const MAX_TRACKED_JOINERS: usize = 4096;

/// Default for [`Admission::max_voters`]: five voters survive two failures;
/// more make every commit wait for more acknowledgements.
pub const DEFAULT_MAX_VOTERS: usize = 5;

/// Default for the capacity a joiner may declare, per node: far beyond any
/// one machine, so that a typo or a lie cannot make placement believe a
/// node is bigger than a rack.
pub const DEFAULT_MAX_NODE_CAPACITY: Capacity = Capacity {
    vcpus: 1024,
    memory_mib: 16 * 1024 * 1024,
};

/// The context string of the token hash (BLAKE3 key derivation).
pub const TOKEN_HASH_CONTEXT: &str = "tern 2026 cluster join token v1";

/// Bytes of a token's secret.
pub const TOKEN_SECRET_LEN: usize = 32;

/// How a leader admits joiners.
#[derive(Debug, Clone)]
pub struct Admission {
    /// A static token from the node's config, accepted besides the tokens
    /// in the cluster state (it never expires; prefer created tokens).
    pub static_token: Option<JoinToken>,
    /// Joiners are promoted to voter automatically only while the cluster
    /// has fewer voters than this; beyond, they stay learners until an
    /// admin promotes them.
    pub max_voters: usize,
    /// The largest capacity a joiner may declare; more is cut to this.
    pub max_capacity: Capacity,
}

impl Default for Admission {
    fn default() -> Self {
        Admission {
            static_token: None,
            max_voters: DEFAULT_MAX_VOTERS,
            max_capacity: DEFAULT_MAX_NODE_CAPACITY,
        }
    }
}

/// The hash the state keeps of a token secret.
pub fn token_hash(secret: &[u8]) -> [u8; TOKEN_HASH_LEN] {
    let mut hasher = blake3::Hasher::new_derive_key(TOKEN_HASH_CONTEXT);
    hasher.update(secret);
    *hasher.finalize().as_bytes()
}

/// A presented token split into its public id and the hash of its secret;
/// `None` if it is not `ID.SECRET` in the expected form.
pub fn parse_token(token: &str) -> Option<(String, [u8; TOKEN_HASH_LEN])> {
    let (id, secret) = token.split_once('.')?;
    if !valid_token_id(id) || secret.len() != TOKEN_SECRET_LEN * 2 {
        return None;
    }
    let secret = hex::decode(secret).ok()?;
    Some((id.to_owned(), token_hash(&secret)))
}

/// Why a presented token admits nobody.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefusal {
    /// Not a token of this cluster (unknown id, other secret, malformed).
    Bad,
    /// Past its expiry.
    Expired,
    /// No uses left.
    UsedUp,
}

impl TokenRefusal {
    /// The `reason` label of [`JOIN_REFUSED`].
    pub fn reason(self) -> &'static str {
        match self {
            TokenRefusal::Bad => "bad_token",
            TokenRefusal::Expired => "expired",
            TokenRefusal::UsedUp => "used_up",
        }
    }

    /// The refusal from the state's rejection of an admission.
    pub fn from_rejection(r: &Rejection) -> Option<TokenRefusal> {
        match r {
            Rejection::UnknownToken { .. } => Some(TokenRefusal::Bad),
            Rejection::TokenExpired { .. } => Some(TokenRefusal::Expired),
            Rejection::TokenUsedUp { .. } => Some(TokenRefusal::UsedUp),
            _ => None,
        }
    }

    /// What the joiner is told (the same for every bad token, so a guesser
    /// learns nothing from it).
    pub fn status(self) -> Status {
        Status::permission_denied(match self {
            TokenRefusal::Bad => {
                "the join token is not valid for this cluster (unknown, revoked or mistyped); \
                 ask an admin for one (tern cluster token create)"
            }
            TokenRefusal::Expired => {
                "the join token has expired; ask an admin for a new one (tern cluster token create)"
            }
            TokenRefusal::UsedUp => {
                "the join token is used up; ask an admin for a new one (tern cluster token create)"
            }
        })
    }
}

/// Checks a presented token against the state at `now_unix_ms`: the id
/// and the hash of its secret when it admits.
pub fn check_token(
    state: &tern_state::ClusterState,
    presented: &str,
    now_unix_ms: u64,
) -> Result<(String, [u8; TOKEN_HASH_LEN]), TokenRefusal> {
    let (id, hash) = parse_token(presented).ok_or(TokenRefusal::Bad)?;
    let record = state.join_tokens().get(&id).ok_or(TokenRefusal::Bad)?;
    // blake3::Hash compares in constant time.
    if blake3::Hash::from(record.hash) != blake3::Hash::from(hash) {
        return Err(TokenRefusal::Bad);
    }
    if now_unix_ms >= record.expires_at_unix_ms {
        return Err(TokenRefusal::Expired);
    }
    if record.uses_left == Some(0) {
        return Err(TokenRefusal::UsedUp);
    }
    Ok((id, hash))
}

/// Counts a refused join under its reason.
pub(crate) fn count_refusal(reason: &'static str) {
    metrics::counter!(JOIN_REFUSED, "reason" => reason).increment(1);
}

/// Failed join attempts, per key and in total, in fixed windows.
#[derive(Debug, Default)]
pub(crate) struct FailedJoins {
    inner: Mutex<FailedInner>,
}

#[derive(Debug, Default)]
struct FailedInner {
    per_key: HashMap<PeerId, (Instant, u32)>,
    total: Option<(Instant, u32)>,
}

fn current(window: Option<(Instant, u32)>, now: Instant) -> u32 {
    match window {
        Some((start, n)) if now.duration_since(start) < FAILED_JOIN_WINDOW => n,
        _ => 0,
    }
}

impl FailedJoins {
    fn lock(&self) -> std::sync::MutexGuard<'_, FailedInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `ResourceExhausted` when `peer`, or everyone together, failed too
    /// often in the current window.
    pub(crate) fn check(&self, peer: &PeerId, now: Instant) -> Result<(), Status> {
        let inner = self.lock();
        let mine = current(inner.per_key.get(peer).copied(), now);
        let all = current(inner.total, now);
        if mine >= FAILED_JOINS_PER_KEY || all >= FAILED_JOINS_TOTAL {
            drop(inner);
            count_refusal("rate_limited");
            tracing::warn!(caller = %peer.short(), "refused a join: too many failed attempts");
            return Err(Status::new(
                Code::ResourceExhausted,
                format!(
                    "too many failed join attempts (at most {FAILED_JOINS_PER_KEY} per key and \
                     {FAILED_JOINS_TOTAL} in all per {} s); check the token and retry later",
                    FAILED_JOIN_WINDOW.as_secs()
                ),
            ));
        }
        Ok(())
    }

    /// Records one failed attempt by `peer`.
    pub(crate) fn record(&self, peer: PeerId, now: Instant) {
        let mut inner = self.lock();
        let bump = |w: Option<(Instant, u32)>| match w {
            Some((start, n)) if now.duration_since(start) < FAILED_JOIN_WINDOW => {
                (start, n.saturating_add(1))
            }
            _ => (now, 1),
        };
        inner.total = Some(bump(inner.total));
        if !inner.per_key.contains_key(&peer) && inner.per_key.len() >= MAX_TRACKED_JOINERS {
            inner
                .per_key
                .retain(|_, (start, _)| now.duration_since(*start) < FAILED_JOIN_WINDOW);
            if inner.per_key.len() >= MAX_TRACKED_JOINERS {
                return;
            }
        }
        let mine = bump(inner.per_key.get(&peer).copied());
        inner.per_key.insert(peer, mine);
    }
}

/// Milliseconds since the Unix epoch by this node's clock.
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn check_request_id(id: &str) -> Result<(), Status> {
    if id.is_empty() || id.len() > MAX_REQUEST_ID_LEN {
        return Err(Status::invalid_argument(format!(
            "field `request_id`: {} bytes; a request id is 1 to {MAX_REQUEST_ID_LEN} bytes",
            id.len()
        )));
    }
    Ok(())
}

/// `PermissionDenied` unless `peer` holds the admin role (the access
/// check in front of the services already said so; this is the Cluster
/// service's own word for calls whose effect `apply` cannot check).
pub(crate) fn require_admin(node: &Attached, peer: &PeerId, what: &str) -> Result<(), Status> {
    let admin = node
        .sm
        .read(|s| s.role_of(peer) == Some(Role::Admin))
        .map_err(|e| Status::unavailable(format!("reading the access table: {e}")))?;
    if admin {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "{what} needs the admin role; call with an admin's --key"
        )))
    }
}

fn info(t: &JoinTokenRecord) -> pb::JoinTokenInfo {
    pb::JoinTokenInfo {
        id: t.id.clone(),
        created_by: Bytes::copy_from_slice(t.created_by.as_bytes()),
        created_at_unix_ms: t.created_at_unix_ms,
        expires_at_unix_ms: t.expires_at_unix_ms,
        uses_left: t.uses_left.unwrap_or(0),
        unlimited: t.uses_left.is_none(),
        used: t.used,
    }
}

/// The live tokens at `now_unix_ms`, without secrets.
fn list(node: &Attached, now_unix_ms: u64) -> Result<pb::TokenListResponse, Status> {
    node.sm
        .read(|s| pb::TokenListResponse {
            tokens: s
                .join_tokens()
                .values()
                .filter(|t| t.is_live(now_unix_ms))
                .map(info)
                .collect(),
        })
        .map_err(|e| Status::unavailable(format!("cannot read the cluster state: {e}")))
}

/// Serves `Cluster/TokenList`.
pub(crate) fn serve_list(node: &Attached, ctx: &RequestContext) -> Result<Bytes, Status> {
    require_admin(node, &ctx.peer, "listing join tokens")?;
    Ok(list(node, unix_ms())?.encode_to_vec().into())
}

/// Proposes an admission command and maps the state's answer.
async fn write(node: &Attached, command: Command) -> Result<Response, Status> {
    tracing::info!(%command, "admission change");
    let written = tokio::time::timeout(
        crate::meta::WRITE_TIMEOUT,
        crate::node::client_write(&node.raft, command),
    )
    .await
    .map_err(|_| Status::unavailable("the change was not committed in time (no quorum?); retry"))?
    .map_err(WriteError::into_status)?;
    match written.data {
        Response::Rejected(why) => Err(tern_services::vm::rejection_status(&why)),
        other => Ok(other),
    }
}

/// Serves `Cluster/TokenCreate`: a fresh id and secret, the hash proposed,
/// the token answered once.
pub(crate) async fn serve_create(
    node: &Attached,
    ctx: &RequestContext,
    payload: Bytes,
) -> Result<Bytes, Status> {
    let req = pb::TokenCreateRequest::decode(payload)
        .map_err(|e| Status::invalid_argument(format!("cluster/token-create: {e}")))?;
    check_request_id(&req.request_id)?;
    let max_secs = MAX_TOKEN_TTL_MS / 1000;
    if req.ttl_secs == 0 || req.ttl_secs > max_secs {
        return Err(Status::invalid_argument(format!(
            "field `ttl_secs`: {}; a token lives 1 to {max_secs} seconds (7 days)",
            req.ttl_secs
        )));
    }
    if req.uses > MAX_TOKEN_USES {
        return Err(Status::invalid_argument(format!(
            "field `uses`: {}; a token allows at most {MAX_TOKEN_USES} uses (0: until it expires)",
            req.uses
        )));
    }
    require_admin(node, &ctx.peer, "creating a join token")?;
    crate::membership::ensure_leader(node)?;
    let mut id = [0u8; TOKEN_ID_LEN / 2];
    let mut secret = [0u8; TOKEN_SECRET_LEN];
    {
        let mut rng = rand::rng();
        rng.fill_bytes(&mut id);
        rng.fill_bytes(&mut secret);
    }
    let id = hex::encode(id);
    let hash = token_hash(&secret);
    let now = unix_ms();
    let record = JoinTokenRecord {
        id: id.clone(),
        hash,
        created_by: ctx.peer,
        created_at_unix_ms: now,
        expires_at_unix_ms: now.saturating_add(req.ttl_secs.saturating_mul(1000)),
        uses_left: (req.uses > 0).then_some(req.uses),
        used: 0,
    };
    write(
        node,
        Command::CreateJoinToken {
            request_id: req.request_id,
            token: record.clone(),
        },
    )
    .await?;
    // A request id seen before is answered from the deduplication table:
    // the token stored then has another secret, which cannot be shown again.
    let stored = node
        .sm
        .read(|s| s.join_tokens().get(&id).map(|t| t.hash == hash))
        .map_err(|e| Status::unavailable(format!("cannot read the cluster state: {e}")))?;
    if stored != Some(true) {
        return Err(Status::new(
            Code::AlreadyExists,
            "this request id created a token before, whose secret cannot be shown again; \
             create another with a new request id (and revoke the first, see tern cluster token list)",
        ));
    }
    Ok(pb::TokenCreateResponse {
        token: format!("{id}.{}", hex::encode(secret)),
        info: Some(info(&record)),
    }
    .encode_to_vec()
    .into())
}

/// Serves `Cluster/TokenRevoke`.
pub(crate) async fn serve_revoke(
    node: &Attached,
    ctx: &RequestContext,
    payload: Bytes,
) -> Result<Bytes, Status> {
    let req = pb::TokenRevokeRequest::decode(payload)
        .map_err(|e| Status::invalid_argument(format!("cluster/token-revoke: {e}")))?;
    check_request_id(&req.request_id)?;
    if !valid_token_id(&req.id) {
        return Err(Status::invalid_argument(format!(
            "field `id`: {:?} is not a token id ({TOKEN_ID_LEN} lowercase hex digits, as tern cluster token list shows)",
            req.id
        )));
    }
    require_admin(node, &ctx.peer, "revoking a join token")?;
    crate::membership::ensure_leader(node)?;
    write(
        node,
        Command::RevokeJoinToken {
            request_id: req.request_id,
            id: req.id,
            by: ctx.peer,
            at_unix_ms: unix_ms(),
        },
    )
    .await?;
    Ok(list(node, unix_ms())?.encode_to_vec().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_only_in_their_form() {
        let secret = [9u8; TOKEN_SECRET_LEN];
        let token = format!("0badcafe.{}", hex::encode(secret));
        let (id, hash) = parse_token(&token).unwrap();
        assert_eq!(id, "0badcafe");
        assert_eq!(hash, token_hash(&secret));
        for bad in [
            "",
            ".",
            "0badcafe",
            "0badcafe.",
            "0BADCAFE.00",
            &format!("0badcafe.{}", hex::encode([9u8; 31])),
            &format!("0badcaf.{}", hex::encode(secret)),
            &format!("0badcafe.{}zz", &hex::encode(secret)[..62]),
        ] {
            assert!(parse_token(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn failed_joins_are_bounded_per_key_and_in_total() {
        let joins = FailedJoins::default();
        let t0 = Instant::now();
        let a = PeerId::from_bytes([1; 32]);
        for _ in 0..FAILED_JOINS_PER_KEY {
            joins.check(&a, t0).unwrap();
            joins.record(a, t0);
        }
        assert_eq!(
            joins.check(&a, t0).unwrap_err().code,
            Code::ResourceExhausted
        );
        // A new window forgives.
        joins.check(&a, t0 + FAILED_JOIN_WINDOW).unwrap();
        // Fresh keys run into the total bound.
        let mut n = FAILED_JOINS_PER_KEY;
        let mut k = 2u8;
        while n < FAILED_JOINS_TOTAL {
            let key = PeerId::from_bytes([k; 32]);
            joins.record(key, t0);
            n += 1;
            k = k.wrapping_add(1);
        }
        let fresh = PeerId::from_bytes([0xee; 32]);
        assert_eq!(
            joins.check(&fresh, t0).unwrap_err().code,
            Code::ResourceExhausted
        );
    }
}
