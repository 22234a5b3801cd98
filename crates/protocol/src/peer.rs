//! Peer identity and addresses.
//!
//! A node *is* its Ed25519 public key ([`PeerId`], the same 32 bytes as its
//! iroh `EndpointId`). Addresses are hints for reaching it: an iroh address
//! (direct socket addresses, a relay URL) and a gRPC URL. Whatever transport
//! carries a call, the identity the receiver sees is an authenticated key,
//! never an address and never a value the caller merely declared.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::pb;

/// A node's identity: its Ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PeerId([u8; 32]);

impl PeerId {
    /// The identity with these public key bytes. Whether the bytes are a
    /// valid curve point is checked by the transport that authenticates the
    /// peer, not here.
    pub const fn from_bytes(bytes: [u8; 32]) -> PeerId {
        PeerId(bytes)
    }

    /// The public key bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The first five bytes in hex, for logs.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..5])
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({})", self.short())
    }
}

/// Why a value could not be read as a peer identity or address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerParseError {
    /// The identity is not 32 bytes (64 hex digits).
    #[error("a peer id is 32 bytes (64 hex digits), got {0}")]
    IdLength(usize),
    /// The identity is not hex.
    #[error("a peer id is hex-encoded: {0}")]
    IdHex(String),
    /// A socket address did not parse.
    #[error("invalid socket address {addr:?}: {reason}")]
    SocketAddr {
        /// The text received.
        addr: String,
        /// Why it is invalid.
        reason: String,
    },
    /// The address names no transport at all.
    #[error("peer {0} has no address for any transport")]
    NoTransport(String),
}

impl FromStr for PeerId {
    type Err = PeerParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = hex::decode(s.trim()).map_err(|e| PeerParseError::IdHex(e.to_string()))?;
        PeerId::try_from(bytes.as_slice())
    }
}

impl TryFrom<&[u8]> for PeerId {
    type Error = PeerParseError;

    fn try_from(bytes: &[u8]) -> Result<Self, Self::Error> {
        let array: [u8; 32] = bytes
            .try_into()
            .map_err(|_| PeerParseError::IdLength(bytes.len()))?;
        Ok(PeerId(array))
    }
}

/// One of the two transports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// tonic, HTTP/2 over TCP.
    Grpc,
    /// iroh, QUIC.
    Iroh,
}

impl TransportKind {
    /// Lower-case name, as in configuration and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::Grpc => "grpc",
            TransportKind::Iroh => "iroh",
        }
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The set of transports a peer serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct TransportSet {
    /// Serves gRPC.
    pub grpc: bool,
    /// Serves iroh.
    pub iroh: bool,
}

impl TransportSet {
    /// Whether `kind` is in the set.
    pub fn contains(self, kind: TransportKind) -> bool {
        match kind {
            TransportKind::Grpc => self.grpc,
            TransportKind::Iroh => self.iroh,
        }
    }
}

/// How to reach a peer over iroh.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct IrohAddr {
    /// Known direct socket addresses.
    pub direct: Vec<SocketAddr>,
    /// The relay the peer uses, if any.
    pub relay_url: Option<String>,
}

/// A peer's identity and how to reach it over each transport it serves.
/// A transport is served exactly when its address is present.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PeerAddr {
    /// Who the peer is.
    pub id: PeerId,
    /// Where to reach it over iroh, if it serves iroh.
    pub iroh: Option<IrohAddr>,
    /// Its gRPC URL (`https://host:port`), if it serves gRPC.
    pub grpc: Option<String>,
}

impl PeerAddr {
    /// A peer with no known address yet.
    pub fn new(id: PeerId) -> PeerAddr {
        PeerAddr {
            id,
            iroh: None,
            grpc: None,
        }
    }

    /// The transports this peer serves.
    pub fn transports(&self) -> TransportSet {
        TransportSet {
            grpc: self.grpc.is_some(),
            iroh: self.iroh.is_some(),
        }
    }
}

impl From<&PeerAddr> for pb::PeerAddress {
    fn from(addr: &PeerAddr) -> pb::PeerAddress {
        let iroh = addr.iroh.clone().unwrap_or_default();
        pb::PeerAddress {
            endpoint_id: addr.id.as_bytes().to_vec().into(),
            iroh_direct_addrs: iroh.direct.iter().map(ToString::to_string).collect(),
            iroh_relay_url: iroh.relay_url.unwrap_or_default(),
            grpc_url: addr.grpc.clone().unwrap_or_default(),
            serves_iroh: addr.iroh.is_some(),
        }
    }
}

impl TryFrom<&pb::PeerAddress> for PeerAddr {
    type Error = PeerParseError;

    fn try_from(addr: &pb::PeerAddress) -> Result<PeerAddr, PeerParseError> {
        let id = PeerId::try_from(addr.endpoint_id.as_ref())?;
        let direct = addr
            .iroh_direct_addrs
            .iter()
            .map(|a| {
                a.parse()
                    .map_err(|e: std::net::AddrParseError| PeerParseError::SocketAddr {
                        addr: a.clone(),
                        reason: e.to_string(),
                    })
            })
            .collect::<Result<Vec<SocketAddr>, _>>()?;
        let relay_url = (!addr.iroh_relay_url.is_empty()).then(|| addr.iroh_relay_url.clone());
        let iroh = (addr.serves_iroh || !direct.is_empty() || relay_url.is_some())
            .then_some(IrohAddr { direct, relay_url });
        let grpc = (!addr.grpc_url.is_empty()).then(|| addr.grpc_url.clone());
        if iroh.is_none() && grpc.is_none() {
            return Err(PeerParseError::NoTransport(id.short()));
        }
        Ok(PeerAddr { id, iroh, grpc })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_id_text_round_trip() {
        let id = PeerId::from_bytes([0xab; 32]);
        let text = id.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text.parse::<PeerId>(), Ok(id));
        assert_eq!(id.short(), "ababababab");
        assert!(matches!(
            "abcd".parse::<PeerId>(),
            Err(PeerParseError::IdLength(2))
        ));
        assert!(matches!(
            "zz".parse::<PeerId>(),
            Err(PeerParseError::IdHex(_))
        ));
    }

    #[test]
    fn address_round_trips_through_protobuf() {
        let addr = PeerAddr {
            id: PeerId::from_bytes([7; 32]),
            iroh: Some(IrohAddr {
                direct: vec![
                    "127.0.0.1:4000".parse().unwrap(),
                    "[::1]:4001".parse().unwrap(),
                ],
                relay_url: Some("https://relay.test".into()),
            }),
            grpc: Some("https://127.0.0.1:7000".into()),
        };
        let pb = pb::PeerAddress::from(&addr);
        assert_eq!(PeerAddr::try_from(&pb), Ok(addr.clone()));
        assert_eq!(
            addr.transports(),
            TransportSet {
                grpc: true,
                iroh: true
            }
        );

        let grpc_only = PeerAddr {
            iroh: None,
            ..addr.clone()
        };
        let back = PeerAddr::try_from(&pb::PeerAddress::from(&grpc_only)).unwrap();
        assert!(!back.transports().contains(TransportKind::Iroh));
        assert!(back.transports().contains(TransportKind::Grpc));
    }

    #[test]
    fn bad_protobuf_addresses_are_typed_errors() {
        let mut pb = pb::PeerAddress {
            endpoint_id: vec![1; 31].into(),
            grpc_url: "https://x".into(),
            ..Default::default()
        };
        assert_eq!(PeerAddr::try_from(&pb), Err(PeerParseError::IdLength(31)));
        pb.endpoint_id = vec![1; 32].into();
        pb.iroh_direct_addrs = vec!["not an address".into()];
        assert!(matches!(
            PeerAddr::try_from(&pb),
            Err(PeerParseError::SocketAddr { .. })
        ));
        let empty = pb::PeerAddress {
            endpoint_id: vec![1; 32].into(),
            ..Default::default()
        };
        assert!(matches!(
            PeerAddr::try_from(&empty),
            Err(PeerParseError::NoTransport(_))
        ));
    }
}
