//! Peer identity over gRPC: authenticated request and response metadata.
//!
//! gRPC over plain HTTP/2 has no identity of its own, so every Tern call
//! carries a proof in its metadata, checked by the receiving node before
//! anything is dispatched. Proofs are MACs under a *pairwise key*: the
//! X25519 Diffie-Hellman of the two nodes' Ed25519 keys (each node's
//! Ed25519 secret doubles as its X25519 secret, its public key converts to
//! the Montgomery form), run through BLAKE3's key derivation. Only the two
//! holders of those secret keys can compute it; a node computes it once per
//! peer and keeps it, so a call costs two BLAKE3 MACs instead of two
//! Ed25519 signatures and two verifications (about 140 µs less per call).
//!
//! - **Request** (caller → callee): the caller's 32-byte public key (its
//!   [`PeerId`]), the callee it means, the time in Unix milliseconds, a
//!   fresh 16-byte nonce, and the MAC under the pair's key of
//!   `REQUEST_DOMAIN ‖ timestamp ‖ nonce ‖ caller ‖ callee ‖ grpc path`.
//!   - A node with key A cannot claim to be B: the callee checks the MAC
//!     under its key with B, which A cannot compute.
//!   - It names the callee and the path, and the key is the pair's, so
//!     replaying it to another node or another method fails.
//!   - It is fresh: timestamps further than [`MAX_CLOCK_SKEW`] from the
//!     receiver's clock are refused, and a [`ReplayCache`] refuses a nonce
//!     seen before within that window.
//! - **Response** (callee → caller): the callee's public key and the MAC
//!   under the pair's key of `RESPONSE_DOMAIN ‖ nonce ‖ caller ‖ callee ‖
//!   grpc path`. The caller checks it with the key it meant to reach, so a
//!   different node at a peer's old address is detected (`WrongPeer`), and
//!   an old response cannot be replayed (the nonce is fresh per call).
//!
//! Keys are refused if they are not valid curve points or have small order
//! (then the shared secret would be predictable). Using one key pair for
//! Ed25519 signatures (iroh) and X25519 is the studied construction of
//! "On using the same key pair for Ed25519 and an X25519 based KEM"
//! (Thormarker, 2021); the domains here are separated by BLAKE3 contexts.
//!
//! What this does not give: confidentiality, and integrity of the message
//! bodies against an on-path attacker (the MACs cover the headers, not the
//! bodies). Those need TLS or a private network; see the crate docs.
//!
//! The checks take the time as an argument, so they are tested without
//! clocks or sockets.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ed25519_dalek::{SigningKey, VerifyingKey};
use http::HeaderMap;
use tern_protocol::PeerId;

/// How far a request's timestamp may be from the receiver's clock, either
/// way. Bounds how long a captured request stays replayable (and so how long
/// the [`ReplayCache`] must remember nonces); wide enough for clocks kept by
/// NTP on machines of one cluster.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(30);

/// Most nonces the [`ReplayCache`] remembers. This covers about 4 000 calls
/// a second for a full window of twice [`MAX_CLOCK_SKEW`]; past it the
/// oldest entries are forgotten first (a replay of those is still refused
/// once its timestamp leaves the window). About 48 bytes an entry, so at
/// most ~25 MiB.
pub const REPLAY_CACHE_CAPACITY: usize = 1 << 19;

/// Most pairwise keys a node keeps. Far above a cluster's size; when full
/// the cache starts over (a key costs one X25519 to compute again), so
/// callers presenting ever new keys cannot grow it without bound.
pub const PAIR_KEY_CACHE_CAPACITY: usize = 4096;

/// BLAKE3 key-derivation context of pairwise keys.
const PAIR_KEY_CONTEXT: &str = "tern grpc transport 2026 pairwise key v1";
/// Domain separation for request MACs (never valid as a response's).
const REQUEST_DOMAIN: &[u8] = b"tern/grpc/request/v1\0";
/// Domain separation for response MACs.
const RESPONSE_DOMAIN: &[u8] = b"tern/grpc/response/v1\0";

/// Length of the per-call nonce.
pub const NONCE_LEN: usize = 16;
/// Length of a MAC.
pub const MAC_LEN: usize = 32;

/// Metadata key: the caller's public key (32 bytes).
pub const CALLER_KEY: &str = "tern-caller-bin";
/// Metadata key: the public key of the node the caller means to reach.
pub const CALLEE_KEY: &str = "tern-callee-bin";
/// Metadata key: the caller's clock, Unix milliseconds in decimal.
pub const TIMESTAMP_KEY: &str = "tern-timestamp";
/// Metadata key: the per-call nonce.
pub const NONCE_KEY: &str = "tern-nonce-bin";
/// Metadata key: the caller's MAC.
pub const MAC_KEY: &str = "tern-mac-bin";
/// Metadata key: the answering node's public key.
pub const NODE_KEY: &str = "tern-node-bin";
/// Metadata key: the answering node's MAC.
pub const NODE_MAC_KEY: &str = "tern-node-mac-bin";

/// A node's identity and the pairwise keys it has computed.
#[derive(Clone)]
pub struct Identity {
    id: PeerId,
    /// The X25519 secret (the Ed25519 secret's expanded scalar bytes).
    dh_secret: [u8; 32],
    pair_keys: Arc<Mutex<HashMap<PeerId, [u8; 32]>>>,
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
        Identity {
            id: PeerId::from_bytes(key.verifying_key().to_bytes()),
            dh_secret: key.to_scalar_bytes(),
            pair_keys: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The public key, which is the node's id.
    pub fn id(&self) -> PeerId {
        self.id
    }

    /// The key this node shares with `peer`: only holders of either secret
    /// key can compute it. Fails if `peer` is not a usable public key.
    pub fn pair_key(&self, peer: PeerId) -> Result<[u8; 32], AuthError> {
        if let Ok(cache) = self.pair_keys.lock()
            && let Some(key) = cache.get(&peer)
        {
            return Ok(*key);
        }
        let public =
            VerifyingKey::from_bytes(peer.as_bytes()).map_err(|_| AuthError::BadKey(peer))?;
        if public.is_weak() {
            return Err(AuthError::BadKey(peer));
        }
        let shared = public.to_montgomery().mul_clamped(self.dh_secret);
        if shared.to_bytes() == [0; 32] {
            return Err(AuthError::BadKey(peer));
        }
        let (low, high) = if self.id <= peer {
            (self.id, peer)
        } else {
            (peer, self.id)
        };
        let mut material = [0u8; 96];
        material[..32].copy_from_slice(&shared.to_bytes());
        material[32..64].copy_from_slice(low.as_bytes());
        material[64..].copy_from_slice(high.as_bytes());
        let key = blake3::derive_key(PAIR_KEY_CONTEXT, &material);
        if let Ok(mut cache) = self.pair_keys.lock() {
            if cache.len() >= PAIR_KEY_CACHE_CAPACITY {
                cache.clear();
            }
            cache.insert(peer, key);
        }
        Ok(key)
    }

    /// Authenticates a request to `callee` for `path` and returns its proof.
    pub fn sign_request(
        &self,
        callee: PeerId,
        path: &str,
        unix_ms: u64,
        nonce: [u8; NONCE_LEN],
    ) -> Result<RequestProof, AuthError> {
        let key = self.pair_key(callee)?;
        Ok(RequestProof {
            caller: self.id,
            callee,
            unix_ms,
            nonce,
            mac: request_mac(&key, unix_ms, &nonce, &self.id, &callee, path),
        })
    }

    /// Checks the proof of a request received by this node on `path` at
    /// `now_ms` and returns the authenticated caller. Does not consult the
    /// replay cache (see [`ReplayCache::check_and_insert`]).
    pub fn verify_request(
        &self,
        proof: &RequestProof,
        path: &str,
        now_ms: u64,
    ) -> Result<PeerId, AuthError> {
        if proof.callee != self.id {
            return Err(AuthError::WrongCallee {
                meant: proof.callee,
                this: self.id,
            });
        }
        let skew_ms = now_ms.abs_diff(proof.unix_ms);
        let limit_ms = skew_limit_ms();
        if skew_ms > limit_ms {
            return Err(AuthError::Stale { skew_ms, limit_ms });
        }
        let key = self.pair_key(proof.caller)?;
        let expected = request_mac(
            &key,
            proof.unix_ms,
            &proof.nonce,
            &proof.caller,
            &proof.callee,
            path,
        );
        // `blake3::Hash` compares in constant time.
        if blake3::Hash::from(expected) != proof.mac {
            return Err(AuthError::BadProof(proof.caller));
        }
        Ok(proof.caller)
    }

    /// The proof for the answer to a request with this nonce from `caller`
    /// on `path` (`None` if `caller` is not a usable key).
    pub fn response_mac(
        &self,
        nonce: &[u8; NONCE_LEN],
        caller: PeerId,
        path: &str,
    ) -> Option<[u8; MAC_LEN]> {
        let key = self.pair_key(caller).ok()?;
        Some(response_mac(&key, nonce, &caller, &self.id, path))
    }

    /// Checks an answer's identity headers, as the caller, against the peer
    /// it meant to reach.
    pub fn verify_response(
        &self,
        headers: &HeaderMap,
        expected: PeerId,
        nonce: &[u8; NONCE_LEN],
        path: &str,
    ) -> ResponseIdentity {
        let Ok(node) = get_bin::<32>(headers, NODE_KEY) else {
            return ResponseIdentity::Unproven("the response carries no node identity");
        };
        let Ok(mac) = get_bin::<MAC_LEN>(headers, NODE_MAC_KEY) else {
            return ResponseIdentity::Unproven("the response carries no node proof");
        };
        let node = PeerId::from_bytes(node);
        let Ok(key) = self.pair_key(node) else {
            return ResponseIdentity::Unproven("the response names an unusable node key");
        };
        let want = response_mac(&key, nonce, &self.id, &node, path);
        if blake3::Hash::from(want) != mac {
            return ResponseIdentity::Unproven("the response's node proof does not verify");
        }
        if node == expected {
            ResponseIdentity::Verified
        } else {
            ResponseIdentity::OtherNode(node)
        }
    }
}

fn request_mac(
    key: &[u8; 32],
    unix_ms: u64,
    nonce: &[u8; NONCE_LEN],
    caller: &PeerId,
    callee: &PeerId,
    path: &str,
) -> [u8; MAC_LEN] {
    let mut mac = blake3::Hasher::new_keyed(key);
    mac.update(REQUEST_DOMAIN);
    mac.update(&unix_ms.to_be_bytes());
    mac.update(nonce);
    mac.update(caller.as_bytes());
    mac.update(callee.as_bytes());
    mac.update(path.as_bytes());
    *mac.finalize().as_bytes()
}

fn response_mac(
    key: &[u8; 32],
    nonce: &[u8; NONCE_LEN],
    caller: &PeerId,
    callee: &PeerId,
    path: &str,
) -> [u8; MAC_LEN] {
    let mut mac = blake3::Hasher::new_keyed(key);
    mac.update(RESPONSE_DOMAIN);
    mac.update(nonce);
    mac.update(caller.as_bytes());
    mac.update(callee.as_bytes());
    mac.update(path.as_bytes());
    *mac.finalize().as_bytes()
}

/// The proof a request carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestProof {
    /// Who claims to call.
    pub caller: PeerId,
    /// Whom the caller means to reach.
    pub callee: PeerId,
    /// The caller's clock when it authenticated the request.
    pub unix_ms: u64,
    /// Fresh per call.
    pub nonce: [u8; NONCE_LEN],
    /// The MAC under the caller's and callee's pairwise key.
    pub mac: [u8; MAC_LEN],
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
    /// The key is not a usable Ed25519 public key (not a curve point, or of
    /// small order).
    #[error("unusable public key {0}")]
    BadKey(PeerId),
    /// The MAC does not verify for the claimed caller.
    #[error("the caller proof does not verify for claimed caller {0}")]
    BadProof(PeerId),
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
        put_bin(headers, MAC_KEY, &self.mac);
        headers.insert(TIMESTAMP_KEY, http::HeaderValue::from(self.unix_ms));
    }

    /// Reads a proof from request headers: `Ok(None)` if the request carries
    /// none at all (a stock gRPC client), an error if it carries a partial
    /// or malformed one.
    pub fn read(headers: &HeaderMap) -> Result<Option<RequestProof>, AuthError> {
        if !headers.contains_key(CALLER_KEY) && !headers.contains_key(MAC_KEY) {
            return Ok(None);
        }
        let caller = get_bin::<32>(headers, CALLER_KEY)?;
        let callee = get_bin::<32>(headers, CALLEE_KEY)?;
        let nonce = get_bin::<NONCE_LEN>(headers, NONCE_KEY)?;
        let mac = get_bin::<MAC_LEN>(headers, MAC_KEY)?;
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
            mac,
        }))
    }
}

fn skew_limit_ms() -> u64 {
    u64::try_from(MAX_CLOCK_SKEW.as_millis()).unwrap_or(u64::MAX)
}

/// What the caller learns from a response's identity headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseIdentity {
    /// The expected peer answered.
    Verified,
    /// Another node (with a valid proof of its own) answered.
    OtherNode(PeerId),
    /// No identity or one that does not verify: not a Tern node we trust.
    Unproven(&'static str),
}

/// Writes a response proof into response headers.
pub fn write_response_proof(headers: &mut HeaderMap, node: PeerId, mac: &[u8; MAC_LEN]) {
    put_bin(headers, NODE_KEY, node.as_bytes());
    put_bin(headers, NODE_MAC_KEY, mac);
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
    fn both_ends_derive_the_same_pairwise_key_and_no_one_else_does() {
        let (a, b, c) = ids();
        let ab = a.pair_key(b.id()).unwrap();
        assert_eq!(ab, b.pair_key(a.id()).unwrap());
        assert_ne!(ab, c.pair_key(a.id()).unwrap());
        assert_ne!(ab, c.pair_key(b.id()).unwrap());
        // Cached value is the same.
        assert_eq!(ab, a.pair_key(b.id()).unwrap());
        // Not a point; the identity point (small order).
        let mut not_a_point = None;
        for byte in 0..=255u8 {
            let candidate = PeerId::from_bytes([byte; 32]);
            if VerifyingKey::from_bytes(candidate.as_bytes()).is_err() {
                not_a_point = Some(candidate);
                break;
            }
        }
        let not_a_point = not_a_point.expect("some constant is not a curve point");
        assert_eq!(a.pair_key(not_a_point), Err(AuthError::BadKey(not_a_point)));
        let mut identity_point = [0u8; 32];
        identity_point[0] = 1;
        let weak = PeerId::from_bytes(identity_point);
        assert_eq!(a.pair_key(weak), Err(AuthError::BadKey(weak)));
    }

    #[test]
    fn a_request_proof_verifies_and_round_trips_through_headers() {
        let (a, b, _) = ids();
        let proof = a.sign_request(b.id(), PATH, NOW, [9; NONCE_LEN]).unwrap();
        let mut headers = HeaderMap::new();
        proof.write(&mut headers);
        let read = RequestProof::read(&headers).unwrap().unwrap();
        assert_eq!(read, proof);
        assert_eq!(b.verify_request(&read, PATH, NOW + 1000), Ok(a.id()));
    }

    #[test]
    fn forged_stale_and_misdirected_requests_are_refused() {
        let (a, b, c) = ids();
        let proof = a.sign_request(b.id(), PATH, NOW, [9; NONCE_LEN]).unwrap();
        // Made by A, claiming to be C.
        let forged = RequestProof {
            caller: c.id(),
            ..proof.clone()
        };
        assert_eq!(
            b.verify_request(&forged, PATH, NOW),
            Err(AuthError::BadProof(c.id()))
        );
        // Replayed to another method.
        assert_eq!(
            b.verify_request(&proof, "/tern.v1.Raft/AppendEntries", NOW),
            Err(AuthError::BadProof(a.id()))
        );
        // Replayed to another node.
        assert!(matches!(
            c.verify_request(&proof, PATH, NOW),
            Err(AuthError::WrongCallee { .. })
        ));
        // Rewritten to name another node.
        let redirected = RequestProof {
            callee: c.id(),
            ..proof.clone()
        };
        assert_eq!(
            c.verify_request(&redirected, PATH, NOW),
            Err(AuthError::BadProof(a.id()))
        );
        // A timestamp rewritten to look fresh.
        let rewritten = RequestProof {
            unix_ms: NOW + 5,
            ..proof.clone()
        };
        assert_eq!(
            b.verify_request(&rewritten, PATH, NOW),
            Err(AuthError::BadProof(a.id()))
        );
        // Too old, too new.
        let limit = skew_limit_ms();
        assert!(matches!(
            b.verify_request(&proof, PATH, NOW + limit + 1),
            Err(AuthError::Stale { .. })
        ));
        assert!(matches!(
            b.verify_request(&proof, PATH, NOW - limit - 1),
            Err(AuthError::Stale { .. })
        ));
        assert!(b.verify_request(&proof, PATH, NOW + limit).is_ok());
    }

    #[test]
    fn partial_or_malformed_headers_are_typed_errors() {
        let (a, b, _) = ids();
        assert_eq!(RequestProof::read(&HeaderMap::new()), Ok(None));
        let mut headers = HeaderMap::new();
        a.sign_request(b.id(), PATH, NOW, [1; NONCE_LEN])
            .unwrap()
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
        let mac = b.response_mac(&nonce, a.id(), PATH).unwrap();
        write_response_proof(&mut headers, b.id(), &mac);
        assert_eq!(
            a.verify_response(&headers, b.id(), &nonce, PATH),
            ResponseIdentity::Verified
        );
        // Another call's nonce: an old response replayed.
        assert!(matches!(
            a.verify_response(&headers, b.id(), &[6; NONCE_LEN], PATH),
            ResponseIdentity::Unproven(_)
        ));
        // C answers where B was expected.
        let mut other = HeaderMap::new();
        let mac = c.response_mac(&nonce, a.id(), PATH).unwrap();
        write_response_proof(&mut other, c.id(), &mac);
        assert_eq!(
            a.verify_response(&other, b.id(), &nonce, PATH),
            ResponseIdentity::OtherNode(c.id())
        );
        // C claims to be B.
        let mut forged = HeaderMap::new();
        write_response_proof(&mut forged, b.id(), &mac);
        assert!(matches!(
            a.verify_response(&forged, b.id(), &nonce, PATH),
            ResponseIdentity::Unproven(_)
        ));
        assert!(matches!(
            a.verify_response(&HeaderMap::new(), b.id(), &nonce, PATH),
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
        // refused as stale by `verify_request`).
        let later = NOW + 3 * skew_limit_ms();
        assert_eq!(cache.check_and_insert([3; NONCE_LEN], later, later), Ok(()));
        assert_eq!(cache.len(), 1);
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        /// A header value of printable ASCII, or absent; sometimes a valid
        /// base64 encoding of random bytes, so parsing gets past base64.
        fn value() -> impl Strategy<Value = Option<String>> {
            prop_oneof![
                Just(None),
                "[ -~]{0,120}".prop_map(Some),
                proptest::collection::vec(any::<u8>(), 0..80)
                    .prop_map(|b| Some(base64::Engine::encode(&BIN, b))),
            ]
        }

        proptest! {
            #[test]
            fn arbitrary_proof_headers_never_panic(
                caller in value(), callee in value(), nonce in value(),
                mac in value(), ts in value(), node in value(), node_mac in value(),
            ) {
                let (a, b, _) = ids();
                let mut headers = HeaderMap::new();
                for (key, v) in [
                    (CALLER_KEY, caller), (CALLEE_KEY, callee), (NONCE_KEY, nonce),
                    (MAC_KEY, mac), (TIMESTAMP_KEY, ts), (NODE_KEY, node),
                    (NODE_MAC_KEY, node_mac),
                ] {
                    if let Some(v) = v
                        && let Ok(v) = http::HeaderValue::from_str(&v)
                    {
                        headers.insert(http::HeaderName::from_static(key), v);
                    }
                }
                if let Ok(Some(proof)) = RequestProof::read(&headers) {
                    // Random bytes never verify.
                    prop_assert!(b.verify_request(&proof, PATH, NOW).is_err());
                }
                prop_assert_ne!(
                    a.verify_response(&headers, b.id(), &[0; NONCE_LEN], PATH),
                    ResponseIdentity::Verified
                );
            }
        }
    }
}
