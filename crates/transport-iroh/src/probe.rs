//! The endpoint's liveness probe: a QUIC version negotiation round trip
//! to its own UDP socket.
//!
//! A QUIC server answers a long-header packet of a version it does not
//! speak with a Version Negotiation packet (RFC 9000 §6, §17.2.1), before
//! and without any connection state. So a plain UDP socket of ours sends
//! the endpoint a padded long-header packet of a reserved version
//! ([`PROBE_VERSION`], of the `0x?a?a?a?a` form RFC 9000 §15 keeps for
//! exactly this) and waits for the answer. An answer proves the whole
//! path of a real datagram: the endpoint's socket receives, iroh hands the
//! datagram to the QUIC endpoint driver, the driver answers, and the
//! answer is sent on the same socket. A socket iroh failed to rebind
//! (closed, see the crate docs) answers nothing.
//!
//! The probe costs one 1200-byte datagram each way, no handshake, no
//! crypto and no connection on the endpoint, and needs no cooperation from
//! any peer, so an idle node is probed as well as a busy one.
//!
//! [`probe_packet`] builds the packet and [`check_reply`] decodes the
//! answer from bytes; an answer must echo our random connection ids, so a
//! stray or forged datagram on the probe socket does not count.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::net::UdpSocket;

/// The version the probe asks for: reserved by RFC 9000 §15 for forcing
/// version negotiation, so no endpoint ever speaks it.
pub const PROBE_VERSION: u32 = 0x1a2a_3a4a;

/// Size of the probe datagram: the smallest a client's Initial may be
/// (RFC 9000 §14.1); a server may ignore shorter long-header packets.
pub const PROBE_LEN: usize = 1200;

/// Length of each of the probe's two connection ids. Any length up to 20
/// is valid for an unknown version as far as the QUIC endpoint parses it.
pub const CID_LEN: usize = 8;

/// Largest answer read: a Version Negotiation packet lists a few
/// versions; anything bigger is not an answer to us.
pub const MAX_REPLY_LEN: usize = 1500;

/// The long-header bit of a QUIC packet's first byte.
const LONG_HEADER: u8 = 0x80;

/// Why an answer is not the Version Negotiation packet the probe asked
/// for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// Shorter than a Version Negotiation header.
    #[error("answer of {len} bytes is too short for a version negotiation packet")]
    TooShort {
        /// Its length.
        len: usize,
    },
    /// Not a long-header packet.
    #[error("answer is not a long-header packet (first byte {first:#04x})")]
    NotLongHeader {
        /// The first byte.
        first: u8,
    },
    /// A long header of a real version, not Version Negotiation.
    #[error("answer has version {version:#010x}, not 0 (version negotiation)")]
    NotVersionNegotiation {
        /// The version field.
        version: u32,
    },
    /// A connection id length runs past the end of the packet.
    #[error("answer's {which} connection id length runs past its end")]
    Truncated {
        /// `destination` or `source`.
        which: &'static str,
    },
    /// The connection ids are not ours swapped.
    #[error("answer's connection ids do not echo the probe's")]
    WrongConnectionIds,
    /// The version list is empty or not whole 4-byte versions.
    #[error("answer's version list is {len} bytes, not a non-empty multiple of 4")]
    BadVersionList {
        /// Its length in bytes.
        len: usize,
    },
}

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The probe's own socket could not be opened or used.
    #[error("probe socket: {0}")]
    Socket(#[from] std::io::Error),
    /// No valid answer within the timeout.
    #[error("no version negotiation answer from {target} within {} ms", timeout.as_millis())]
    NoAnswer {
        /// The address probed.
        target: SocketAddr,
        /// How long the probe waited.
        timeout: Duration,
    },
}

/// The probe datagram: a long header with [`PROBE_VERSION`], destination
/// id `dcid`, source id `scid`, padded with zeros to [`PROBE_LEN`].
pub fn probe_packet(dcid: &[u8; CID_LEN], scid: &[u8; CID_LEN]) -> Vec<u8> {
    let mut packet = Vec::with_capacity(PROBE_LEN);
    // Long header, fixed bit set, type Initial (as a client would send).
    packet.push(LONG_HEADER | 0x40);
    packet.extend_from_slice(&PROBE_VERSION.to_be_bytes());
    packet.push(CID_LEN as u8);
    packet.extend_from_slice(dcid);
    packet.push(CID_LEN as u8);
    packet.extend_from_slice(scid);
    packet.resize(PROBE_LEN, 0);
    packet
}

/// Checks that `reply` is a Version Negotiation packet answering the probe
/// sent with `dcid` and `scid`: version 0, our ids swapped (RFC 9000
/// §17.2.1), and a non-empty list of whole versions.
pub fn check_reply(
    reply: &[u8],
    dcid: &[u8; CID_LEN],
    scid: &[u8; CID_LEN],
) -> Result<(), ReplyError> {
    // First byte, version, and the two id lengths at least.
    if reply.len() < 7 {
        return Err(ReplyError::TooShort { len: reply.len() });
    }
    let first = reply[0];
    if first & LONG_HEADER == 0 {
        return Err(ReplyError::NotLongHeader { first });
    }
    let version = u32::from_be_bytes([reply[1], reply[2], reply[3], reply[4]]);
    if version != 0 {
        return Err(ReplyError::NotVersionNegotiation { version });
    }
    let (their_dcid, rest) = cid(&reply[5..], "destination")?;
    let (their_scid, versions) = cid(rest, "source")?;
    if their_dcid != scid.as_slice() || their_scid != dcid.as_slice() {
        return Err(ReplyError::WrongConnectionIds);
    }
    if versions.is_empty() || !versions.len().is_multiple_of(4) {
        return Err(ReplyError::BadVersionList {
            len: versions.len(),
        });
    }
    Ok(())
}

/// Splits a length-prefixed connection id off `bytes`.
fn cid<'a>(bytes: &'a [u8], which: &'static str) -> Result<(&'a [u8], &'a [u8]), ReplyError> {
    let (&len, rest) = bytes.split_first().ok_or(ReplyError::Truncated { which })?;
    let len = usize::from(len);
    if rest.len() < len {
        return Err(ReplyError::Truncated { which });
    }
    Ok(rest.split_at(len))
}

/// The address to probe for an endpoint bound to `bound`: the loopback
/// address of its family when it is bound to an unspecified one, else the
/// bound address itself.
pub fn probe_target(bound: SocketAddr) -> SocketAddr {
    match bound.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), bound.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), bound.port())
        }
        _ => bound,
    }
}

/// Probes the endpoint listening at `target` once: sends the probe from a
/// fresh socket and waits up to `timeout` for a valid answer, ignoring
/// anything else that arrives.
pub async fn probe(target: SocketAddr, timeout: Duration) -> Result<(), ProbeError> {
    let any: IpAddr = match target {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let socket = UdpSocket::bind(SocketAddr::new(any, 0)).await?;
    let dcid: [u8; CID_LEN] = rand::random();
    let scid: [u8; CID_LEN] = rand::random();
    socket.send_to(&probe_packet(&dcid, &scid), target).await?;
    let answer = async {
        let mut buf = vec![0u8; MAX_REPLY_LEN];
        loop {
            let (len, from) = socket.recv_from(&mut buf).await?;
            if from.port() == target.port() && check_reply(&buf[..len], &dcid, &scid).is_ok() {
                return Ok::<(), std::io::Error>(());
            }
        }
    };
    match tokio::time::timeout(timeout, answer).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(ProbeError::NoAnswer { target, timeout }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // reason: tests.

    use super::*;
    use proptest::prelude::*;

    /// A Version Negotiation packet answering `(dcid, scid)`, as RFC 9000
    /// §17.2.1 draws it.
    fn answer(dcid: &[u8], scid: &[u8], versions: &[u32]) -> Vec<u8> {
        let mut out = vec![0xc0, 0, 0, 0, 0, scid.len() as u8];
        out.extend_from_slice(scid);
        out.push(dcid.len() as u8);
        out.extend_from_slice(dcid);
        for v in versions {
            out.extend_from_slice(&v.to_be_bytes());
        }
        out
    }

    #[test]
    fn the_probe_is_a_padded_long_header_of_the_reserved_version() {
        let p = probe_packet(&[1; CID_LEN], &[2; CID_LEN]);
        assert_eq!(p.len(), PROBE_LEN);
        assert_eq!(p[0] & LONG_HEADER, LONG_HEADER);
        assert_eq!(&p[1..5], &PROBE_VERSION.to_be_bytes());
        assert_eq!(p[5] as usize, CID_LEN);
        assert_eq!(&p[6..6 + CID_LEN], &[1; CID_LEN]);
        assert_eq!(p[6 + CID_LEN] as usize, CID_LEN);
        assert_eq!(&p[7 + CID_LEN..7 + 2 * CID_LEN], &[2; CID_LEN]);
    }

    #[test]
    fn a_matching_answer_passes_and_each_fault_is_named() {
        let (d, s) = ([1; CID_LEN], [2; CID_LEN]);
        let good = answer(&d, &s, &[1, 0x0a1a_2a3a]);
        assert_eq!(check_reply(&good, &d, &s), Ok(()));

        assert_eq!(
            check_reply(&good[..4], &d, &s),
            Err(ReplyError::TooShort { len: 4 })
        );
        let mut short_header = good.clone();
        short_header[0] = 0x40;
        assert_eq!(
            check_reply(&short_header, &d, &s),
            Err(ReplyError::NotLongHeader { first: 0x40 })
        );
        let mut versioned = good.clone();
        versioned[4] = 1;
        assert_eq!(
            check_reply(&versioned, &d, &s),
            Err(ReplyError::NotVersionNegotiation { version: 1 })
        );
        // Ids not swapped: an answer to somebody else's probe.
        assert_eq!(
            check_reply(&answer(&s, &d, &[1]), &d, &s),
            Err(ReplyError::WrongConnectionIds)
        );
        assert_eq!(
            check_reply(&answer(&d, &s, &[]), &d, &s),
            Err(ReplyError::BadVersionList { len: 0 })
        );
        let mut ragged = good.clone();
        ragged.push(7);
        assert_eq!(
            check_reply(&ragged, &d, &s),
            Err(ReplyError::BadVersionList { len: 9 })
        );
        let mut long_cid = good[..6].to_vec();
        long_cid[5] = 200;
        long_cid.push(0);
        assert_eq!(
            check_reply(&long_cid, &d, &s),
            Err(ReplyError::Truncated {
                which: "destination"
            })
        );
    }

    #[test]
    fn unspecified_binds_are_probed_on_loopback() {
        let v4: SocketAddr = "0.0.0.0:4433".parse().unwrap();
        assert_eq!(probe_target(v4), "127.0.0.1:4433".parse().unwrap());
        let v6: SocketAddr = "[::]:4433".parse().unwrap();
        assert_eq!(probe_target(v6), "[::1]:4433".parse().unwrap());
        let fixed: SocketAddr = "10.1.2.3:4433".parse().unwrap();
        assert_eq!(probe_target(fixed), fixed);
    }

    proptest! {
        /// Any bytes at all: a typed answer, never a panic; and only a
        /// packet echoing our ids can pass.
        #[test]
        fn any_bytes_decode_without_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..64),
            d in any::<[u8; CID_LEN]>(),
            s in any::<[u8; CID_LEN]>(),
        ) {
            if check_reply(&bytes, &d, &s).is_ok() {
                prop_assert_eq!(&bytes[6..6 + CID_LEN], &s[..]);
                prop_assert_eq!(&bytes[7 + CID_LEN..7 + 2 * CID_LEN], &d[..]);
            }
        }

        /// Every well-formed answer to our ids passes.
        #[test]
        fn every_answer_to_our_ids_passes(
            d in any::<[u8; CID_LEN]>(),
            s in any::<[u8; CID_LEN]>(),
            versions in proptest::collection::vec(any::<u32>(), 1..8),
        ) {
            prop_assert_eq!(check_reply(&answer(&d, &s, &versions), &d, &s), Ok(()));
        }
    }
}
