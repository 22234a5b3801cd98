//! Node identity over TLS 1.3: certificates bound to the Ed25519 node key,
//! and the verifiers that turn a handshake into a [`PeerId`].
//!
//! A node is one identity on both transports: its iroh key. The gRPC
//! transport proves that key in the TLS handshake, on the model of libp2p's
//! TLS handshake specification:
//!
//! - At start each node makes a fresh ECDSA P-256 key pair for TLS and a
//!   self-signed certificate for it. The certificate carries one extra,
//!   non-critical extension ([`IDENTITY_EXTENSION_OID`]) holding the node's
//!   Ed25519 public key and its signature over
//!   `SIGNATURE_PREFIX ‖ the certificate's SubjectPublicKeyInfo` — the node
//!   key vouches for the TLS key.
//! - TLS 1.3's `CertificateVerify` proves that the peer holds the TLS key;
//!   the extension proves that the node key chose that TLS key. Together
//!   they prove the node key, and nothing else is trusted: no CA, no names,
//!   no certificate files to manage. A captured certificate is useless
//!   without its TLS private key, which never leaves the process.
//! - **The dialler** ([`client_config`]) accepts exactly the peer id it
//!   dialled; any other valid identity fails the handshake with a
//!   [`WrongPeer`] cause, so the client reports `WrongPeer` and sends
//!   nothing.
//! - **The server** ([`server_config`]) asks for a client certificate but
//!   does not require one: a caller that presents a valid one is that node
//!   ([`peer_id`] of the session's certificate); a caller without one
//!   (`grpcurl -insecure`, Python `grpcio` with TLS) is anonymous and
//!   reaches health and reflection only. A certificate that is present but
//!   invalid fails the handshake.
//!
//! Why ECDSA P-256 for the TLS key and not the Ed25519 node key itself:
//! BoringSSL (Python `grpcio`, most stock gRPC stacks) does not offer
//! Ed25519 among the signature algorithms it verifies by default, so an
//! Ed25519 certificate would lock stock tools out of health and reflection.
//!
//! Only TLS 1.3 is offered, with ALPN `h2`; the certificate's validity
//! dates are not checked (the identity is the key, and a node's certificate
//! lives as long as the process).

use std::sync::Arc;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tern_protocol::PeerId;

/// The OID of the identity extension: under `2.25` (the UUID arc, open to
/// anyone without registration); the last arc is the ASCII of `terntls1`.
pub const IDENTITY_EXTENSION_OID: &[u64] = &[2, 25, 0x7465_726e_746c_7331];

/// What the node key signs, before the TLS key's SubjectPublicKeyInfo, so
/// that the signature can never be taken for one made for another purpose.
pub const SIGNATURE_PREFIX: &[u8] = b"tern-tls-handshake:v1:";

/// The ALPN protocol both sides speak.
pub const ALPN_H2: &[u8] = b"h2";

/// Server name a client puts in its handshake. SNI is not sent and the
/// verifier ignores names; rustls merely needs one. Stock clients that
/// check names against the certificate use this one too
/// (`grpc.ssl_target_name_override`).
pub const SERVER_NAME: &str = "tern-node";

/// Length of the extension's DER value: `SEQUENCE { OCTET STRING (32),
/// OCTET STRING (64) }`.
const EXTENSION_LEN: usize = 2 + 2 + 32 + 2 + 64;
/// The fixed DER header bytes of the extension value, around the key and
/// the signature.
const SEQUENCE_HEADER: [u8; 2] = [0x30, 0x64];
const KEY_HEADER: [u8; 2] = [0x04, 0x20];
const SIGNATURE_HEADER: [u8; 2] = [0x04, 0x40];
const _: () = assert!(EXTENSION_LEN == 2 + 0x64);

/// Why a certificate does not prove an identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    /// Not a DER X.509 certificate.
    #[error("the certificate is not valid DER X.509: {0}")]
    Unparsable(String),
    /// A chain was sent where a single self-signed certificate belongs.
    #[error("expected one self-signed certificate, got a chain of {0}")]
    Chain(usize),
    /// No identity extension.
    #[error("the certificate carries no Tern identity extension")]
    NoIdentity,
    /// The extension appears more than once.
    #[error("the certificate carries the Tern identity extension twice")]
    DuplicateIdentity,
    /// The extension's value is not the expected structure.
    #[error("the Tern identity extension is malformed")]
    MalformedIdentity,
    /// The key in the extension is not a valid Ed25519 key.
    #[error("the node key in the certificate is not a valid Ed25519 key")]
    BadNodeKey,
    /// The node key's signature over the TLS key does not verify.
    #[error("the node key's signature over the certificate's key does not verify")]
    BadSignature,
}

/// The peer in the handshake is a valid node, but not the one dialled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected node {expected}, but the peer proved it is node {actual}")]
pub struct WrongPeer {
    /// The id the caller dialled.
    pub expected: PeerId,
    /// The id the peer proved.
    pub actual: PeerId,
}

/// A node's TLS credentials: its certificate and the TLS private key,
/// made for its Ed25519 node key.
#[derive(Clone)]
pub struct TlsIdentity {
    id: PeerId,
    cert: CertificateDer<'static>,
    key_pkcs8: Arc<Vec<u8>>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Making a certificate failed (an internal error of the crypto library).
#[derive(Debug, thiserror::Error)]
#[error("making the node's TLS certificate failed: {0}")]
pub struct IdentityError(String);

impl TlsIdentity {
    /// Makes a TLS key and a certificate bound to the node key `secret`.
    pub fn new(secret: &[u8; 32]) -> Result<TlsIdentity, IdentityError> {
        let node_key = SigningKey::from_bytes(secret);
        let tls_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| IdentityError(e.to_string()))?;
        let spki = rcgen::PublicKeyData::subject_public_key_info(&tls_key);
        let signature = node_key.sign(&signed_message(&spki));
        let mut params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_owned()])
            .map_err(|e| IdentityError(e.to_string()))?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            PeerId::from_bytes(node_key.verifying_key().to_bytes()).to_string(),
        );
        params
            .custom_extensions
            .push(rcgen::CustomExtension::from_oid_content(
                IDENTITY_EXTENSION_OID,
                extension_value(&node_key.verifying_key().to_bytes(), &signature.to_bytes()),
            ));
        let cert = params
            .self_signed(&tls_key)
            .map_err(|e| IdentityError(e.to_string()))?;
        Ok(TlsIdentity {
            id: PeerId::from_bytes(node_key.verifying_key().to_bytes()),
            cert: cert.der().clone(),
            key_pkcs8: Arc::new(tls_key.serialize_der()),
        })
    }

    /// The node id the certificate proves.
    pub fn id(&self) -> PeerId {
        self.id
    }

    /// The certificate, DER.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The certificate as PEM, for stock clients that want a root to trust
    /// (Python `grpcio`'s `ssl_channel_credentials(root_certificates=…)`).
    pub fn certificate_pem(&self) -> String {
        use base64::Engine as _;
        let body = base64::engine::general_purpose::STANDARD.encode(self.cert.as_ref());
        let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
        for line in body.as_bytes().chunks(64) {
            pem.push_str(&String::from_utf8_lossy(line));
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
        pem
    }

    fn chain_and_key(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        (
            vec![self.cert.clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8.as_ref().clone())),
        )
    }
}

/// The node id of an Ed25519 secret key (its public key).
pub fn peer_id_of_secret(secret: &[u8; 32]) -> PeerId {
    PeerId::from_bytes(SigningKey::from_bytes(secret).verifying_key().to_bytes())
}

fn signed_message(spki: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(SIGNATURE_PREFIX.len() + spki.len());
    message.extend_from_slice(SIGNATURE_PREFIX);
    message.extend_from_slice(spki);
    message
}

fn extension_value(key: &[u8; 32], signature: &[u8; 64]) -> Vec<u8> {
    let mut value = Vec::with_capacity(EXTENSION_LEN);
    value.extend_from_slice(&SEQUENCE_HEADER);
    value.extend_from_slice(&KEY_HEADER);
    value.extend_from_slice(key);
    value.extend_from_slice(&SIGNATURE_HEADER);
    value.extend_from_slice(signature);
    value
}

/// Parses the identity extension's value into key and signature bytes.
fn parse_extension_value(value: &[u8]) -> Result<([u8; 32], [u8; 64]), CertError> {
    if value.len() != EXTENSION_LEN
        || value[0..2] != SEQUENCE_HEADER
        || value[2..4] != KEY_HEADER
        || value[36..38] != SIGNATURE_HEADER
    {
        return Err(CertError::MalformedIdentity);
    }
    let key: [u8; 32] = value[4..36]
        .try_into()
        .map_err(|_| CertError::MalformedIdentity)?;
    let signature: [u8; 64] = value[38..102]
        .try_into()
        .map_err(|_| CertError::MalformedIdentity)?;
    Ok((key, signature))
}

/// The node id a certificate proves: the Ed25519 key in its identity
/// extension, whose signature over the certificate's own public key must
/// verify. (That the peer holds the certificate's TLS key is the
/// handshake's `CertificateVerify`, checked by the verifiers below.)
pub fn peer_id(cert: &CertificateDer<'_>) -> Result<PeerId, CertError> {
    let (rest, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| CertError::Unparsable(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CertError::Unparsable(format!(
            "{} bytes after the certificate",
            rest.len()
        )));
    }
    let oid = x509_parser::oid_registry::Oid::from(IDENTITY_EXTENSION_OID)
        .map_err(|_| CertError::MalformedIdentity)?;
    let mut found = parsed.extensions().iter().filter(|e| e.oid == oid);
    let extension = found.next().ok_or(CertError::NoIdentity)?;
    if found.next().is_some() {
        return Err(CertError::DuplicateIdentity);
    }
    let (key, signature) = parse_extension_value(extension.value)?;
    let node_key = VerifyingKey::from_bytes(&key).map_err(|_| CertError::BadNodeKey)?;
    if node_key.is_weak() {
        return Err(CertError::BadNodeKey);
    }
    let spki = parsed.public_key().raw;
    node_key
        .verify_strict(&signed_message(spki), &Signature::from_bytes(&signature))
        .map_err(|_| CertError::BadSignature)?;
    Ok(PeerId::from_bytes(key))
}

/// The peer id of a handshake's certificate chain (one certificate).
pub fn peer_id_of_chain(chain: &[CertificateDer<'_>]) -> Result<PeerId, CertError> {
    match chain {
        [cert] => peer_id(cert),
        other => Err(CertError::Chain(other.len())),
    }
}

/// The one crypto provider (ring), made once: configurations and every
/// handshake signature check share it.
fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// The handshake signature schemes accepted: those of the TLS keys nodes
/// make (ECDSA P-256), plus Ed25519 for peers that use their node key
/// directly as the TLS key in a later version.
const SCHEMES: &[SignatureScheme] = &[
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ED25519,
];

fn cert_error(e: CertError) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(e),
    )))
}

/// Both ends' verifier: a peer's chain must be one certificate proving a
/// node identity; the dialler's (`expected` set) also wants exactly that
/// node, the server's (`None`) takes any.
#[derive(Debug)]
struct NodeVerifier {
    expected: Option<PeerId>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl NodeVerifier {
    fn new(expected: Option<PeerId>) -> Arc<NodeVerifier> {
        Arc::new(NodeVerifier {
            expected,
            algorithms: provider().signature_verification_algorithms,
        })
    }

    /// The node the chain proves, checked against `expected`.
    fn identity(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<(), rustls::Error> {
        if !intermediates.is_empty() {
            return Err(cert_error(CertError::Chain(intermediates.len() + 1)));
        }
        let actual = peer_id(end_entity).map_err(cert_error)?;
        match self.expected {
            Some(expected) if expected != actual => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(WrongPeer {
                    expected,
                    actual,
                }))),
            )),
            _ => Ok(()),
        }
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if !SCHEMES.contains(&dss.scheme) {
            return Err(rustls::PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme.into());
        }
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }
}

impl ServerCertVerifier for NodeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.identity(end_entity, intermediates)
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::PeerIncompatible::Tls12NotOffered.into())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        SCHEMES.to_vec()
    }
}

impl ClientCertVerifier for NodeVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        // Stock tools without a key reach health and reflection.
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.identity(end_entity, intermediates)
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::PeerIncompatible::Tls12NotOffered.into())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        SCHEMES.to_vec()
    }
}

/// Building a rustls configuration failed (an internal error).
#[derive(Debug, thiserror::Error)]
#[error("building the TLS configuration failed: {0}")]
pub struct ConfigError(#[from] rustls::Error);

/// The server side: TLS 1.3 only, ALPN `h2`, the node's certificate, and
/// an optional client certificate that must prove a node identity.
pub fn server_config(identity: &TlsIdentity) -> Result<rustls::ServerConfig, ConfigError> {
    let (chain, key) = identity.chain_and_key();
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(NodeVerifier::new(None))
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // Resumption would let a later connection skip the certificate, and
    // with it the identity; 0-RTT data could be replayed. Neither is worth
    // it for a handful of long-lived connections per peer.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.max_early_data_size = 0;
    Ok(config)
}

/// A client configuration pinned to `expected`: TLS 1.3 only, ALPN `h2`,
/// no SNI, no resumption; `cert` is the client certificate and its key,
/// or `None` for an anonymous client.
fn pinned_client(
    expected: PeerId,
    cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<rustls::ClientConfig, ConfigError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(NodeVerifier::new(Some(expected)));
    let mut config = match cert {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// The client side: the node's certificate as client certificate, and a
/// verifier that accepts exactly `expected`.
pub fn client_config(
    identity: &TlsIdentity,
    expected: PeerId,
) -> Result<rustls::ClientConfig, ConfigError> {
    pinned_client(expected, Some(identity.chain_and_key()))
}

/// A client configuration with no client certificate, pinned to
/// `expected`: what a stock tool has, for tools and tests that must reach
/// a node anonymously (health and reflection only).
pub fn anonymous_client_config(expected: PeerId) -> Result<rustls::ClientConfig, ConfigError> {
    pinned_client(expected, None)
}

/// A client configuration that presents `chain` and `key` as they are (no
/// check that they prove anything), pinned to `expected`: for tests that
/// play a client with a forged certificate.
pub fn client_config_with_cert(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    expected: PeerId,
) -> Result<rustls::ClientConfig, ConfigError> {
    pinned_client(expected, Some((chain, key)))
}

/// Finds a [`WrongPeer`] in an error's chain of causes.
pub fn find_wrong_peer(error: &(dyn std::error::Error + 'static)) -> Option<WrongPeer> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        if let Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other))) =
            e.downcast_ref::<rustls::Error>()
            && let Some(wrong) = other.0.downcast_ref::<WrongPeer>()
        {
            return Some(wrong.clone());
        }
        if let Some(wrong) = e.downcast_ref::<WrongPeer>() {
            return Some(wrong.clone());
        }
        // `io::Error::source` skips the error it wraps; look inside.
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && let Some(wrong) = find_wrong_peer(inner)
        {
            return Some(wrong);
        }
        cause = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_certificate_proves_its_node_key() {
        let identity = TlsIdentity::new(&[7; 32]).unwrap();
        let expected =
            PeerId::from_bytes(SigningKey::from_bytes(&[7; 32]).verifying_key().to_bytes());
        assert_eq!(identity.id(), expected);
        assert_eq!(peer_id(identity.certificate()).unwrap(), expected);
        assert!(
            identity
                .certificate_pem()
                .starts_with("-----BEGIN CERTIFICATE-----\n")
        );
        // Two starts of the same node: different TLS keys, one identity.
        let again = TlsIdentity::new(&[7; 32]).unwrap();
        assert_ne!(again.certificate(), identity.certificate());
        assert_eq!(peer_id(again.certificate()).unwrap(), expected);
    }

    #[test]
    fn another_nodes_extension_on_my_tls_key_does_not_verify() {
        // The attacker copies node 1's identity extension into a
        // certificate for its own TLS key: the signature covers node 1's
        // TLS key, not the attacker's.
        let victim = TlsIdentity::new(&[1; 32]).unwrap();
        let (_, victim_cert) = x509_parser::parse_x509_certificate(victim.certificate()).unwrap();
        let oid = x509_parser::oid_registry::Oid::from(IDENTITY_EXTENSION_OID).unwrap();
        let stolen = victim_cert
            .extensions()
            .iter()
            .find(|e| e.oid == oid)
            .unwrap()
            .value
            .to_vec();
        let tls_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_owned()]).unwrap();
        params
            .custom_extensions
            .push(rcgen::CustomExtension::from_oid_content(
                IDENTITY_EXTENSION_OID,
                stolen,
            ));
        let forged = params.self_signed(&tls_key).unwrap();
        assert_eq!(peer_id(forged.der()), Err(CertError::BadSignature));

        // No extension at all: a plain self-signed certificate.
        let plain = rcgen::CertificateParams::new(vec![SERVER_NAME.to_owned()])
            .unwrap()
            .self_signed(&tls_key)
            .unwrap();
        assert_eq!(peer_id(plain.der()), Err(CertError::NoIdentity));
    }

    #[test]
    fn malformed_extensions_are_typed_errors() {
        let good = extension_value(&[9; 32], &[8; 64]);
        assert!(parse_extension_value(&good).is_ok());
        assert_eq!(
            parse_extension_value(&good[..good.len() - 1]),
            Err(CertError::MalformedIdentity)
        );
        let mut bad = good.clone();
        bad[2] = 0x05;
        assert_eq!(
            parse_extension_value(&bad),
            Err(CertError::MalformedIdentity)
        );
        assert_eq!(peer_id_of_chain(&[]), Err(CertError::Chain(0)));
    }

    proptest! {
        #[test]
        fn arbitrary_certificate_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = peer_id(&CertificateDer::from(bytes));
        }

        #[test]
        fn a_flipped_certificate_byte_never_yields_another_identity(index in any::<prop::sample::Index>(), bit in 0u8..8) {
            let identity = TlsIdentity::new(&[3; 32]).unwrap();
            let mut bytes = identity.certificate().as_ref().to_vec();
            let i = index.index(bytes.len());
            bytes[i] ^= 1 << bit;
            if let Ok(id) = peer_id(&CertificateDer::from(bytes)) {
                // Flips outside the signed parts (the certificate's own
                // signature, its dates) leave the identity as it was.
                prop_assert_eq!(id, identity.id());
            }
        }
    }
}
