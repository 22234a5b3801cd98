//! Peer identity over gRPC: signed request and response metadata.
//!
//! gRPC over plain HTTP/2 has no identity of its own, so every Tern call
//! carries a proof in its metadata, checked by the receiving node before
//! anything is dispatched:
//!
//! - **Request** (caller → callee): the caller's 32-byte Ed25519 public key
//!   (its [`PeerId`]), the callee it means, the time in Unix milliseconds, a
//!   fresh 16-byte nonce, and an Ed25519 signature by the caller's key over
//!   `REQUEST_DOMAIN ‖ timestamp ‖ nonce ‖ callee ‖ grpc path`.
//!   - A signature made by key A cannot claim to be key B (it is checked
//!     against the claimed key).
//!   - It names the callee, so replaying it to another node fails; it names
//!     the path, so replaying it to another method fails.
//!   - It is fresh: timestamps further than [`MAX_CLOCK_SKEW`] from the
//!     receiver's clock are refused, and a [`ReplayCache`] refuses a nonce
//!     seen before within that window.
//! - **Response** (callee → caller): the callee's public key and its
//!   signature over `RESPONSE_DOMAIN ‖ nonce ‖ caller ‖ grpc path`. The
//!   caller checks it against the key it meant to reach, so a different node
//!   at a peer's old address is detected (`WrongPeer`) and an old response
//!   cannot be replayed (the nonce is the caller's, fresh per call).
//!
//! What this does not give: confidentiality, and integrity of the message
//! bodies against an on-path attacker (the signatures cover the headers, not
//! the bodies). Those need TLS or a private network; see the crate docs.
//!
//! Everything here is pure: time is passed in, so the checks are tested
//! without clocks or sockets.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use http::HeaderMap;
use tern_protocol::PeerId;

/// How far a request's timestamp may be from the receiver's clock, either
/// way. Bounds how long a captured request stays replayable (and so how long
/// the [`ReplayCache`] must remember nonces); wide enough for clocks kept by
/// NTP on machines of one cluster.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(30);

/// Most nonces the [`ReplayCache`] remembers. At the skew window of
/// [`MAX_CLOCK_SKEW`] either way this covers about 4 000 calls a second for
/// a full window; past it the oldest entries are forgotten first (a replay
/// of those is still refused once its timestamp leaves the window). About
/// 48 bytes an entry, so at most ~25 MiB.
pub const REPLAY_CACHE_CAPACITY: usize = 1 << 19;

/// Domain separation for request signatures (never valid as a response's).
const REQUEST_DOMAIN: &[u8] = b"tern/grpc/request/v1\0";
/// Domain separation for response signatures.
const RESPONSE_DOMAIN: &[u8] = b"tern/grpc/response/v1\0";

/// Length of the per-call nonce.
pub const NONCE_LEN: usize = 16;

/// Metadata key: the caller's public key (32 bytes).
pub const CALLER_KEY: &str = "tern-caller-bin";
/// Metadata key: the public key of the node the caller means to reach.
pub const CALLEE_KEY: &str = "tern-callee-bin";
/// Metadata key: the caller's clock, Unix milliseconds in decimal.
pub const TIMESTAMP_KEY: &str = "tern-timestamp";
/// Metadata key: the per-call nonce.
pub const NONCE_KEY: &str = "tern-nonce-bin";
/// Metadata key: the caller's signature.
pub const SIGNATURE_KEY: &str = "tern-signature-bin";
/// Metadata key: the answering node's public key.
pub const NODE_KEY: &str = "tern-node-bin";
/// Metadata key: the answering node's signature.
pub const NODE_SIGNATURE_KEY: &str = "tern-node-signature-bin";

/// A node's signing identity.
#[derive(Clone)]
pub struct Identity {
    key: SigningKey,
    id: PeerId,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("id", &self.id).finish()
    }
}

impl Identity {
    /// The identity of this Ed25519 secret key.
    pub fn from_secret(secret: &[u8; 32]) -> Identity {
        let key = SigningKey::from_bytes(secret);
        let id = PeerId::from_bytes(key.verifying_key().to_bytes());
        Identity { key, id }
    }

    /// The public key, which is the node's id.
    pub fn id(&self) -> PeerId {
        self.id
    }

    /// Signs a request to `callee` for `path` and returns its proof.
    pub fn sign_request(
        &self,
        callee: PeerId,
        path: &str,
        unix_ms: u64,
        nonce: [u8; NONCE_LEN],
    ) -> RequestProof {
        let msg = request_message(unix_ms, &nonce, &callee, path);
        RequestProof {
            caller: self.id,
            callee,
            unix_ms,
            nonce,
            signature: self.key.sign(&msg).to_bytes(),
        }
    }

    /// Signs the answer to a request with this nonce from `caller` on `path`.
    pub fn sign_response(&self, nonce: &[u8; NONCE_LEN], caller: PeerId, path: &str) -> [u8; 64] {
        self.key
            .sign(&response_message(nonce, &caller, path))
            .to_bytes()
    }
}

fn request_message(unix_ms: u64, nonce: &[u8; NONCE_LEN], callee: &PeerId, path: &str) -> Vec<u8> {
    let mut msg = Vec::with_capacity(REQUEST_DOMAIN.len() + 8 + NONCE_LEN + 32 + path.len());
    msg.extend_from_slice(REQUEST_DOMAIN);
    msg.extend_from_slice(&unix_ms.to_be_bytes());
    msg.extend_from_slice(nonce);
    msg.extend_from_slice(callee.as_bytes());
    msg.extend_from_slice(path.as_bytes());
    msg
}

fn response_message(nonce: &[u8; NONCE_LEN], caller: &PeerId, path: &str) -> Vec<u8> {
    let mut msg = Vec::with_capacity(RESPONSE_DOMAIN.len() + NONCE_LEN + 32 + path.len());
    msg.extend_from_slice(RESPONSE_DOMAIN);
    msg.extend_from_slice(nonce);
    msg.extend_from_slice(caller.as_bytes());
    msg.extend_from_slice(path.as_bytes());
    msg
}

/// The proof a request carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestProof {
    /// Who claims to call.
    pub caller: PeerId,
    /// Whom the caller means to reach.
    pub callee: PeerId,
    /// The caller's clock when it signed.
    pub unix_ms: u64,
    /// Fresh per call.
    pub nonce: [u8; NONCE_LEN],
    /// The caller's signature.
    pub signature: [u8; 64],
}

/// Why a request's proof was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// A proof field is missing or malformed.
    #[error("malformed caller proof: {0}")]
    Malformed(&'static str),
    /// The proof is for another node.
    #[error("the request is meant for node {meant}, this is node {this}")]
    WrongCallee {
        /// The node named in the request.
        meant: PeerId,
        /// This node.
        this: PeerId,
    },
    /// The timestamp is outside the allowed skew.
    #[error("stale or future timestamp: {skew_ms} ms from this node's clock (limit {limit_ms} ms)")]
    Stale {
        /// How far off it is.
        skew_ms: u64,
        /// The limit.
        limit_ms: u64,
    },
    /// The claimed key is not a valid Ed25519 key or the signature does not
    /// verify against it.
    #[error("bad signature for claimed caller {0}")]
    BadSignature(PeerId),
    /// The nonce was seen before.
    #[error("replayed request")]
    Replayed,
}

impl RequestProof {
    /// Writes the proof into request headers.
    pub fn write(&self, headers: &mut HeaderMap) {
        put_bin(headers, CALLER_KEY, self.caller.as_bytes());
        put_bin(headers, CALLEE_KEY, self.callee.as_bytes());
        put_bin(headers, NONCE_KEY, &self.nonce);
        put_bin(headers, SIGNATURE_KEY, &self.signature);
        headers.insert(TIMESTAMP_KEY, http::HeaderValue::from(self.unix_ms));
    }

    /// Reads a proof from request headers: `Ok(None)` if the request carries
    /// none at all (a stock gRPC client), an error if it carries a partial
    /// or malformed one.
    pub fn read(headers: &HeaderMap) -> Result<Option<RequestProof>, AuthError> {
        if !headers.contains_key(CALLER_KEY) && !headers.contains_key(SIGNATURE_KEY) {
            return Ok(None);
        }
        let caller = get_bin::<32>(headers, CALLER_KEY)?;
        let callee = get_bin::<32>(headers, CALLEE_KEY)?;
        let nonce = get_bin::<NONCE_LEN>(headers, NONCE_KEY)?;
        let signature = get_bin::<64>(headers, SIGNATURE_KEY)?;
        let unix_ms = headers
            .get(TIMESTAMP_KEY)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or(AuthError::Malformed(TIMESTAMP_KEY))?;
        Ok(Some(RequestProof {
            caller: PeerId::from_bytes(caller),
            callee: PeerId::from_bytes(callee),
            unix_ms,
            nonce,
            signature,
        }))
    }

    /// Checks the proof for a request received by `this` node on `path` at
    /// `now_ms`. Does not consult the replay cache (see
    /// [`ReplayCache::check_and_insert`]).
    pub fn verify(&self, this: PeerId, path: &str, now_ms: u64) -> Result<PeerId, AuthError> {
        if self.callee != this {
            return Err(AuthError::WrongCallee {
                meant: self.callee,
                this,
            });
        }
        let skew_ms = now_ms.abs_diff(self.unix_ms);
        let limit_ms = skew_limit_ms();
        if skew_ms > limit_ms {
            return Err(AuthError::Stale { skew_ms, limit_ms });
        }
        let key = VerifyingKey::from_bytes(self.caller.as_bytes())
            .map_err(|_| AuthError::BadSignature(self.caller))?;
        let msg = request_message(self.unix_ms, &self.nonce, &self.callee, path);
        key.verify_strict(&msg, &Signature::from_bytes(&self.signature))
            .map_err(|_| AuthError::BadSignature(self.caller))?;
        Ok(self.caller)
    }
}

fn skew_limit_ms() -> u64 {
    u64::try_from(MAX_CLOCK_SKEW.as_millis()).unwrap_or(u64::MAX)
}

/// What the caller learns from a response's identity headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseIdentity {
    /// The expected peer signed it.
    Verified,
    /// Another node (with a valid signature of its own) answered.
    OtherNode(PeerId),
    /// No identity or one that does not verify: not a Tern node we trust.
    Unproven(&'static str),
}

/// Writes a response proof into response headers.
pub fn write_response_proof(headers: &mut HeaderMap, node: PeerId, signature: &[u8; 64]) {
    put_bin(headers, NODE_KEY, node.as_bytes());
    put_bin(headers, NODE_SIGNATURE_KEY, signature);
}

/// Checks a response's identity headers against the peer the caller meant.
pub fn verify_response(
    headers: &HeaderMap,
    expected: PeerId,
    nonce: &[u8; NONCE_LEN],
    caller: PeerId,
    path: &str,
) -> ResponseIdentity {
    let Ok(node) = get_bin::<32>(headers, NODE_KEY) else {
        return ResponseIdentity::Unproven("the response carries no node identity");
    };
    let Ok(signature) = get_bin::<64>(headers, NODE_SIGNATURE_KEY) else {
        return ResponseIdentity::Unproven("the response carries no node signature");
    };
    let Ok(key) = VerifyingKey::from_bytes(&node) else {
        return ResponseIdentity::Unproven("the response names an invalid node key");
    };
    let msg = response_message(nonce, &caller, path);
    if key
        .verify_strict(&msg, &Signature::from_bytes(&signature))
        .is_err()
    {
        return ResponseIdentity::Unproven("the response's node signature does not verify");
    }
    let node = PeerId::from_bytes(node);
    if node == expected {
        ResponseIdentity::Verified
    } else {
        ResponseIdentity::OtherNode(node)
    }
}

/// gRPC binary metadata: standard base64, emitted without padding,
/// accepted with or without.
const BIN: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

fn put_bin(headers: &mut HeaderMap, key: &'static str, bytes: &[u8]) {
    let encoded = base64::Engine::encode(&BIN, bytes);
    if let Ok(value) = http::HeaderValue::from_str(&encoded) {
        headers.insert(http::HeaderName::from_static(key), value);
    }
}

fn get_bin<const N: usize>(headers: &HeaderMap, key: &'static str) -> Result<[u8; N], AuthError> {
    let value = headers.get(key).ok_or(AuthError::Malformed(key))?;
    let decoded =
        base64::Engine::decode(&BIN, value.as_bytes()).map_err(|_| AuthError::Malformed(key))?;
    <[u8; N]>::try_from(decoded.as_slice()).map_err(|_| AuthError::Malformed(key))
}

/// Remembers recently seen request nonces so that a captured request cannot
/// be replayed to the same node and method within the skew window.
#[derive(Debug, Default)]
pub struct ReplayCache {
    seen: HashMap<[u8; NONCE_LEN], u64>,
    order: VecDeque<([u8; NONCE_LEN], u64)>,
}

impl ReplayCache {
    /// Records `nonce` (from a request stamped `unix_ms`, already verified),
    /// or refuses it if it was seen before. Forgets entries whose timestamp
    /// has left the skew window at `now_ms`, and the oldest past
    /// [`REPLAY_CACHE_CAPACITY`].
    pub fn check_and_insert(
        &mut self,
        nonce: [u8; NONCE_LEN],
        unix_ms: u64,
        now_ms: u64,
    ) -> Result<(), AuthError> {
        let horizon = now_ms.saturating_sub(2 * skew_limit_ms());
        while let Some((old, ts)) = self.order.front().copied() {
            if ts >= horizon && self.order.len() < REPLAY_CACHE_CAPACITY {
                break;
            }
            self.order.pop_front();
            if self.seen.get(&old) == Some(&ts) {
                self.seen.remove(&old);
            }
        }
        if self.seen.contains_key(&nonce) {
            return Err(AuthError::Replayed);
        }
        self.seen.insert(nonce, unix_ms);
        self.order.push_back((nonce, unix_ms));
        Ok(())
    }

    /// Nonces remembered now.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether no nonce is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// The system clock in Unix milliseconds (0 if it is before 1970).
pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: &str = "/tern.v1.Raft/Vote";
    const NOW: u64 = 1_800_000_000_000;

    fn ids() -> (Identity, Identity, Identity) {
        (
            Identity::from_secret(&[1; 32]),
            Identity::from_secret(&[2; 32]),
            Identity::from_secret(&[3; 32]),
        )
    }

    #[test]
    fn a_signed_request_verifies_and_round_trips_through_headers() {
        let (a, b, _) = ids();
        let proof = a.sign_request(b.id(), PATH, NOW, [9; NONCE_LEN]);
        let mut headers = HeaderMap::new();
        proof.write(&mut headers);
        let read = RequestProof::read(&headers).unwrap().unwrap();
        assert_eq!(read, proof);
        assert_eq!(read.verify(b.id(), PATH, NOW + 1000), Ok(a.id()));
    }

    #[test]
    fn forged_stale_and_misdirected_requests_are_refused() {
        let (a, b, c) = ids();
        let proof = a.sign_request(b.id(), PATH, NOW, [9; NONCE_LEN]);
        // Signed by A, claiming to be C.
        let forged = RequestProof {
            caller: c.id(),
            ..proof.clone()
        };
        assert_eq!(
            forged.verify(b.id(), PATH, NOW),
            Err(AuthError::BadSignature(c.id()))
        );
        // Replayed to another method.
        assert_eq!(
            proof.verify(b.id(), "/tern.v1.Raft/AppendEntries", NOW),
            Err(AuthError::BadSignature(a.id()))
        );
        // Replayed to another node.
        assert!(matches!(
            proof.verify(c.id(), PATH, NOW),
            Err(AuthError::WrongCallee { .. })
        ));
        // Rewritten to name another node.
        let redirected = RequestProof {
            callee: c.id(),
            ..proof.clone()
        };
        assert_eq!(
            redirected.verify(c.id(), PATH, NOW),
            Err(AuthError::BadSignature(a.id()))
        );
        // Too old, too new.
        let limit = skew_limit_ms();
        assert!(matches!(
            proof.verify(b.id(), PATH, NOW + limit + 1),
            Err(AuthError::Stale { .. })
        ));
        assert!(matches!(
            proof.verify(b.id(), PATH, NOW - limit - 1),
            Err(AuthError::Stale { .. })
        ));
        assert!(proof.verify(b.id(), PATH, NOW + limit).is_ok());
        // Not a curve point.
        let junk = RequestProof {
            caller: PeerId::from_bytes([0xff; 32]),
            ..proof
        };
        assert!(matches!(
            junk.verify(b.id(), PATH, NOW),
            Err(AuthError::BadSignature(_))
        ));
    }

    #[test]
    fn partial_or_malformed_headers_are_typed_errors() {
        let (a, b, _) = ids();
        assert_eq!(RequestProof::read(&HeaderMap::new()), Ok(None));
        let mut headers = HeaderMap::new();
        a.sign_request(b.id(), PATH, NOW, [1; NONCE_LEN])
            .write(&mut headers);
        let mut missing = headers.clone();
        missing.remove(NONCE_KEY);
        assert_eq!(
            RequestProof::read(&missing),
            Err(AuthError::Malformed(NONCE_KEY))
        );
        let mut bad_ts = headers.clone();
        bad_ts.insert(TIMESTAMP_KEY, http::HeaderValue::from_static("soon"));
        assert_eq!(
            RequestProof::read(&bad_ts),
            Err(AuthError::Malformed(TIMESTAMP_KEY))
        );
        let mut short = headers;
        short.insert(CALLER_KEY, http::HeaderValue::from_static("AAAA"));
        assert_eq!(
            RequestProof::read(&short),
            Err(AuthError::Malformed(CALLER_KEY))
        );
    }

    #[test]
    fn responses_prove_the_answering_node() {
        let (a, b, c) = ids();
        let nonce = [5; NONCE_LEN];
        let mut headers = HeaderMap::new();
        write_response_proof(&mut headers, b.id(), &b.sign_response(&nonce, a.id(), PATH));
        assert_eq!(
            verify_response(&headers, b.id(), &nonce, a.id(), PATH),
            ResponseIdentity::Verified
        );
        // Another call's nonce: an old response replayed.
        assert!(matches!(
            verify_response(&headers, b.id(), &[6; NONCE_LEN], a.id(), PATH),
            ResponseIdentity::Unproven(_)
        ));
        // C answers where B was expected.
        let mut other = HeaderMap::new();
        write_response_proof(&mut other, c.id(), &c.sign_response(&nonce, a.id(), PATH));
        assert_eq!(
            verify_response(&other, b.id(), &nonce, a.id(), PATH),
            ResponseIdentity::OtherNode(c.id())
        );
        // C claims to be B.
        let mut forged = HeaderMap::new();
        write_response_proof(&mut forged, b.id(), &c.sign_response(&nonce, a.id(), PATH));
        assert!(matches!(
            verify_response(&forged, b.id(), &nonce, a.id(), PATH),
            ResponseIdentity::Unproven(_)
        ));
        assert!(matches!(
            verify_response(&HeaderMap::new(), b.id(), &nonce, a.id(), PATH),
            ResponseIdentity::Unproven(_)
        ));
    }

    #[test]
    fn the_replay_cache_refuses_repeats_and_forgets_old_entries() {
        let mut cache = ReplayCache::default();
        assert!(cache.is_empty());
        assert_eq!(cache.check_and_insert([1; NONCE_LEN], NOW, NOW), Ok(()));
        assert_eq!(
            cache.check_and_insert([1; NONCE_LEN], NOW, NOW),
            Err(AuthError::Replayed)
        );
        assert_eq!(cache.check_and_insert([2; NONCE_LEN], NOW, NOW), Ok(()));
        assert_eq!(cache.len(), 2);
        // Far later both have left the window (and a replay of them would be
        // refused as stale by `verify`).
        let later = NOW + 3 * skew_limit_ms();
        assert_eq!(cache.check_and_insert([3; NONCE_LEN], later, later), Ok(()));
        assert_eq!(cache.len(), 1);
    }
}
