//! Frames: the unit of every message on an iroh stream.
//!
//! A frame is a fixed 24-byte header followed by `payload_len` bytes of
//! payload. All integers are little-endian.
//!
//! ```text
//!  0       1       2               4               6               8
//!  +-------+-------+---------------+---------------+---------------+
//!  |version| kind  |     flags     |    service    |    method     |
//!  +-------+-------+---------------+---------------+---------------+
//!  8                                                              16
//!  +---------------------------------------------------------------+
//!  |                       request id (u64)                        |
//!  +-------------------------------+-------------------------------+
//! 16                              20                              24
//!  |      payload length (u32)     |       deadline ms (u32)       |
//!  +-------------------------------+-------------------------------+
//!
//!  flags:  bits 0-1  priority class (0 control, 1 replication,
//!                    2 normal, 3 bulk)
//!          bit  2    idempotent: the request may be applied twice safely
//!          bits 3-15 reserved, must be zero
//! ```
//!
//! - `version` is [`VERSION`]; anything else is refused, so a future layout
//!   bumps it rather than being misread.
//! - `request id` correlates responses, errors, stream frames and cancels
//!   with their request; it is unique per connection, so calls multiplex.
//! - `deadline ms` is the time the caller still grants a request (0 = none),
//!   the same thing gRPC carries as `grpc-timeout`. It is zero on every other
//!   kind of frame.
//! - `ping` and `pong` frames belong to the connection, not to a service:
//!   their service and method are zero.
//!
//! Decoding ([`Header::decode`], [`decode`]) checks the payload length
//! against [`Limits::max_payload`] *before* anything is allocated and turns
//! every malformed header into a [`FrameError`]; it never panics. Encoding
//! ([`Frame::encode`]) never copies the payload: it yields the header and
//! the payload's [`Bytes`] as one chained [`Buf`], ready for a vectored write.

use bytes::buf::Chain;
use bytes::{Buf, Bytes, BytesMut};
use std::io::Cursor;

use crate::catalog::ServiceId;

/// The wire format version this crate speaks.
pub const VERSION: u8 = 1;

/// Size of every frame header in bytes.
pub const HEADER_LEN: usize = 24;

/// Default ceiling on one frame's payload: 16 MiB. Large transfers
/// (snapshots, VM images) are cut into chunks well below it, so a peer never
/// makes us hold more than this for one frame.
pub const DEFAULT_MAX_PAYLOAD: u32 = 16 * 1024 * 1024;

/// The highest [`Limits::max_payload`] a configuration may set: 256 MiB.
/// Beyond it a single frame would pin too much memory per stream.
pub const MAX_PAYLOAD_CEILING: u32 = 256 * 1024 * 1024;

const _: () = assert!(DEFAULT_MAX_PAYLOAD <= MAX_PAYLOAD_CEILING);
const _: () = assert!(HEADER_LEN == 24);

// Field offsets, pinned by a test.
const OFF_VERSION: usize = 0;
const OFF_KIND: usize = 1;
const OFF_FLAGS: usize = 2;
const OFF_SERVICE: usize = 4;
const OFF_METHOD: usize = 6;
const OFF_REQUEST_ID: usize = 8;
const OFF_PAYLOAD_LEN: usize = 16;
const OFF_DEADLINE: usize = 20;

const FLAG_PRIORITY_MASK: u16 = 0b11;
const FLAG_IDEMPOTENT: u16 = 1 << 2;
const FLAG_KNOWN: u16 = FLAG_PRIORITY_MASK | FLAG_IDEMPOTENT;

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// A call: service, method, payload, deadline.
    Request = 1,
    /// The successful answer to the request with the same id.
    Response = 2,
    /// A failed answer; the payload is an encoded [`crate::Status`].
    Error = 3,
    /// A chunk of a streamed body belonging to a request id.
    StreamData = 4,
    /// The end of a streamed body.
    StreamEnd = 5,
    /// The caller gave up on the request with this id.
    Cancel = 6,
    /// Connection liveness and round-trip probe; answered by a pong that
    /// echoes the payload.
    Ping = 7,
    /// The answer to a ping.
    Pong = 8,
}

impl FrameKind {
    /// Every kind, in wire order.
    pub const ALL: [FrameKind; 8] = [
        FrameKind::Request,
        FrameKind::Response,
        FrameKind::Error,
        FrameKind::StreamData,
        FrameKind::StreamEnd,
        FrameKind::Cancel,
        FrameKind::Ping,
        FrameKind::Pong,
    ];

    /// The kind with this wire value, if any.
    pub fn from_u8(value: u8) -> Option<FrameKind> {
        FrameKind::ALL.into_iter().find(|k| *k as u8 == value)
    }

    /// Whether frames of this kind belong to the connection (ping, pong)
    /// rather than to a service call.
    pub fn is_connection_level(self) -> bool {
        matches!(self, FrameKind::Ping | FrameKind::Pong)
    }
}

/// Priority class of a frame, visible on the wire so that both ends schedule
/// it. Lower values are more urgent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
#[repr(u8)]
pub enum Priority {
    /// Raft votes and heartbeats: never wait behind anything else.
    Control = 0,
    /// Raft log replication.
    Replication = 1,
    /// Service calls (health, status, VM operations, monitoring).
    #[default]
    Normal = 2,
    /// Snapshots and VM images: throughput, not latency.
    Bulk = 3,
}

impl Priority {
    /// Every class, most urgent first.
    pub const ALL: [Priority; 4] = [
        Priority::Control,
        Priority::Replication,
        Priority::Normal,
        Priority::Bulk,
    ];

    /// The class with these two flag bits.
    fn from_bits(bits: u16) -> Priority {
        match bits & FLAG_PRIORITY_MASK {
            0 => Priority::Control,
            1 => Priority::Replication,
            2 => Priority::Normal,
            _ => Priority::Bulk,
        }
    }

    /// Lower-case name, used in metric labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Control => "control",
            Priority::Replication => "replication",
            Priority::Normal => "normal",
            Priority::Bulk => "bulk",
        }
    }
}

/// Limits a decoder enforces. A transport builds one from configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload accepted in one frame, at most [`MAX_PAYLOAD_CEILING`].
    pub max_payload: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload: DEFAULT_MAX_PAYLOAD,
        }
    }
}

/// Why a payload ceiling cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitsError {
    /// Zero bytes.
    #[error("max_payload must be at least 1 byte")]
    Zero,
    /// Above [`MAX_PAYLOAD_CEILING`].
    #[error(
        "max_payload {0} is above the ceiling of {MAX_PAYLOAD_CEILING} bytes; send large bodies \
         in chunks instead"
    )]
    AboveCeiling(u32),
}

impl Limits {
    /// Limits with this payload ceiling, or an error saying why it cannot be
    /// used.
    pub fn new(max_payload: u32) -> Result<Limits, LimitsError> {
        if max_payload == 0 {
            return Err(LimitsError::Zero);
        }
        if max_payload > MAX_PAYLOAD_CEILING {
            return Err(LimitsError::AboveCeiling(max_payload));
        }
        Ok(Limits { max_payload })
    }
}

/// A malformed or unacceptable frame header.
///
/// Every variant says enough for the receiver to answer: where the request
/// id could be read it is included, so an error frame can be sent back for
/// that call instead of dropping the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The peer speaks another version of the wire format.
    #[error("unsupported frame version {version} (this node speaks version {VERSION})")]
    UnsupportedVersion {
        /// The version byte received.
        version: u8,
    },
    /// The kind byte names no frame kind.
    #[error("unknown frame kind {kind}")]
    UnknownKind {
        /// The kind byte received.
        kind: u8,
    },
    /// A reserved flag bit is set.
    #[error("reserved frame flags set: {flags:#06x}")]
    ReservedFlags {
        /// The flags received.
        flags: u16,
    },
    /// The service id names no service this version knows.
    #[error("unknown service id {service} in request {request_id}")]
    UnknownService {
        /// The service id received.
        service: u16,
        /// The request id, so the call can be answered with an error.
        request_id: u64,
    },
    /// The payload is larger than the configured limit; nothing was
    /// allocated for it.
    #[error("frame payload of {len} bytes exceeds the limit of {max} bytes (request {request_id})")]
    Oversize {
        /// Declared payload length.
        len: u32,
        /// The limit in force.
        max: u32,
        /// The request id, so the call can be answered with an error.
        request_id: u64,
    },
    /// A field holds a value not allowed for this kind of frame.
    #[error("{kind:?} frame has an invalid {field}")]
    InvalidField {
        /// The frame's kind.
        kind: FrameKind,
        /// The offending field.
        field: &'static str,
    },
    /// The input ended inside a frame.
    #[error("input ended inside a frame: have {have} bytes, need {need}")]
    Truncated {
        /// Bytes available.
        have: usize,
        /// Bytes the frame needs.
        need: usize,
    },
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Header {
    /// What the frame is.
    pub kind: FrameKind,
    /// Scheduling class.
    pub priority: Priority,
    /// The request may be applied twice without harm (a fallback or a
    /// retry on a new connection may send it again). 0-RTT early data asks
    /// more: a read-only method, by the receiver's own catalogue.
    pub idempotent: bool,
    /// Target service; [`ServiceId::Connection`] for ping and pong.
    pub service: ServiceId,
    /// Method within the service (validated at dispatch, not here).
    pub method: u16,
    /// Correlates frames of one call; unique per connection.
    pub request_id: u64,
    /// Length of the payload that follows.
    pub payload_len: u32,
    /// Remaining deadline in milliseconds on requests, 0 for none or on
    /// other kinds.
    pub deadline_ms: u32,
}

impl Header {
    /// Encodes the header into its 24 wire bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        let flags = (self.priority as u16) | if self.idempotent { FLAG_IDEMPOTENT } else { 0 };
        out[OFF_VERSION] = VERSION;
        out[OFF_KIND] = self.kind as u8;
        out[OFF_FLAGS..OFF_FLAGS + 2].copy_from_slice(&flags.to_le_bytes());
        out[OFF_SERVICE..OFF_SERVICE + 2].copy_from_slice(&(self.service as u16).to_le_bytes());
        out[OFF_METHOD..OFF_METHOD + 2].copy_from_slice(&self.method.to_le_bytes());
        out[OFF_REQUEST_ID..OFF_REQUEST_ID + 8].copy_from_slice(&self.request_id.to_le_bytes());
        out[OFF_PAYLOAD_LEN..OFF_PAYLOAD_LEN + 4].copy_from_slice(&self.payload_len.to_le_bytes());
        out[OFF_DEADLINE..OFF_DEADLINE + 4].copy_from_slice(&self.deadline_ms.to_le_bytes());
        out
    }

    /// Decodes and validates a header. The payload length is checked against
    /// `limits` here, so a reader may allocate `payload_len` bytes once this
    /// returns `Ok`.
    pub fn decode(bytes: &[u8; HEADER_LEN], limits: Limits) -> Result<Header, FrameError> {
        let u16_at = |off: usize| u16::from_le_bytes([bytes[off], bytes[off + 1]]);
        let u32_at = |off: usize| {
            u32::from_le_bytes([bytes[off], bytes[off + 1], bytes[off + 2], bytes[off + 3]])
        };
        let version = bytes[OFF_VERSION];
        if version != VERSION {
            return Err(FrameError::UnsupportedVersion { version });
        }
        let kind = FrameKind::from_u8(bytes[OFF_KIND]).ok_or(FrameError::UnknownKind {
            kind: bytes[OFF_KIND],
        })?;
        let flags = u16_at(OFF_FLAGS);
        if flags & !FLAG_KNOWN != 0 {
            return Err(FrameError::ReservedFlags { flags });
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&bytes[OFF_REQUEST_ID..OFF_REQUEST_ID + 8]);
        let request_id = u64::from_le_bytes(id);
        let raw_service = u16_at(OFF_SERVICE);
        let service = ServiceId::from_u16(raw_service).ok_or(FrameError::UnknownService {
            service: raw_service,
            request_id,
        })?;
        let method = u16_at(OFF_METHOD);
        let payload_len = u32_at(OFF_PAYLOAD_LEN);
        if payload_len > limits.max_payload {
            return Err(FrameError::Oversize {
                len: payload_len,
                max: limits.max_payload,
                request_id,
            });
        }
        let deadline_ms = u32_at(OFF_DEADLINE);

        let header = Header {
            kind,
            priority: Priority::from_bits(flags),
            idempotent: flags & FLAG_IDEMPOTENT != 0,
            service,
            method,
            request_id,
            payload_len,
            deadline_ms,
        };
        header.validate()?;
        Ok(header)
    }

    /// Checks the rules that tie fields to the frame kind.
    fn validate(&self) -> Result<(), FrameError> {
        let invalid = |field| {
            Err(FrameError::InvalidField {
                kind: self.kind,
                field,
            })
        };
        let connection = self.service == ServiceId::Connection;
        if self.kind.is_connection_level() {
            if !connection {
                return invalid("service (must be 0 on ping and pong)");
            }
            if self.method != 0 {
                return invalid("method (must be 0 on ping and pong)");
            }
        } else if connection {
            return Err(FrameError::UnknownService {
                service: 0,
                request_id: self.request_id,
            });
        }
        if self.kind != FrameKind::Request && self.deadline_ms != 0 {
            return invalid("deadline (only requests carry one)");
        }
        Ok(())
    }
}

/// A whole frame: header and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The header; `header.payload_len` always equals `payload.len()` for
    /// frames built by this crate's constructors and decoder.
    pub header: Header,
    /// The payload, shared, never copied by encoding.
    pub payload: Bytes,
}

/// The bytes of an encoded frame: the 24 header bytes chained with the
/// payload. Write it with `write_all_buf` or a vectored write; the payload is
/// never copied.
pub type EncodedFrame = Chain<Cursor<[u8; HEADER_LEN]>, Bytes>;

/// Why a frame could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("payload of {len} bytes does not fit in one frame (at most {max}); send it in chunks")]
pub struct PayloadTooLarge {
    /// The payload length.
    pub len: usize,
    /// The ceiling in force.
    pub max: u32,
}

impl Frame {
    /// Builds a frame, checking the payload against `limits`.
    pub fn new(
        mut header: Header,
        payload: Bytes,
        limits: Limits,
    ) -> Result<Frame, PayloadTooLarge> {
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|len| *len <= limits.max_payload)
            .ok_or(PayloadTooLarge {
                len: payload.len(),
                max: limits.max_payload,
            })?;
        header.payload_len = len;
        Ok(Frame { header, payload })
    }

    /// Encodes the frame without copying the payload.
    pub fn encode(&self) -> EncodedFrame {
        Cursor::new(self.header.encode()).chain(self.payload.clone())
    }

    /// Total encoded length.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }
}

/// The result of a decode attempt that did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// A whole frame; its bytes were removed from the buffer.
    Frame(Frame),
    /// The buffer holds only part of a frame; read at least `needed` more
    /// bytes and try again. Nothing was consumed.
    Incomplete {
        /// How many more bytes the next frame needs at least.
        needed: usize,
    },
}

/// Decodes one frame from the front of `buf`.
///
/// On success the frame's bytes are split off `buf` without copying the
/// payload. When `buf` holds only part of a frame, nothing is consumed and
/// [`Decoded::Incomplete`] says how many more bytes are needed. A malformed
/// header is an error; the stream it came from cannot be resynchronised and
/// should be reset (after answering the request id the error names, if any).
pub fn decode(buf: &mut BytesMut, limits: Limits) -> Result<Decoded, FrameError> {
    let Some(header_bytes) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(Decoded::Incomplete {
            needed: HEADER_LEN - buf.len(),
        });
    };
    let header = Header::decode(header_bytes, limits)?;
    let total = HEADER_LEN + header.payload_len as usize;
    if buf.len() < total {
        return Ok(Decoded::Incomplete {
            needed: total - buf.len(),
        });
    }
    buf.advance(HEADER_LEN);
    let payload = buf.split_to(header.payload_len as usize).freeze();
    Ok(Decoded::Frame(Frame { header, payload }))
}

/// Decodes one frame from a byte slice, copying at most the payload (which
/// is bounded by `limits`). Returns the frame and how many bytes it used.
/// Input that ends inside a frame is [`FrameError::Truncated`]: use this for
/// complete messages (datagrams, fuzzing); use [`decode`] for streams.
pub fn decode_slice(input: &[u8], limits: Limits) -> Result<(Frame, usize), FrameError> {
    let Some(header_bytes) = input.first_chunk::<HEADER_LEN>() else {
        return Err(FrameError::Truncated {
            have: input.len(),
            need: HEADER_LEN,
        });
    };
    let header = Header::decode(header_bytes, limits)?;
    let total = HEADER_LEN + header.payload_len as usize;
    let Some(payload) = input.get(HEADER_LEN..total) else {
        return Err(FrameError::Truncated {
            have: input.len(),
            need: total,
        });
    };
    Ok((
        Frame {
            header,
            payload: Bytes::copy_from_slice(payload),
        },
        total,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            kind: FrameKind::Request,
            priority: Priority::Bulk,
            idempotent: true,
            service: ServiceId::Vm,
            method: 0x0102,
            request_id: 0x0807_0605_0403_0201,
            payload_len: 0x0d0c_0b0a,
            deadline_ms: 0x1413_1211,
        }
    }

    #[test]
    fn header_layout_is_pinned() {
        assert_eq!(HEADER_LEN, 24);
        let bytes = sample().encode();
        assert_eq!(bytes[0], VERSION, "version at offset 0");
        assert_eq!(bytes[1], 1, "kind at offset 1");
        assert_eq!(
            &bytes[2..4],
            &[0b111, 0],
            "flags at offset 2..4 (bulk=3 | idempotent)"
        );
        assert_eq!(&bytes[4..6], &[3, 0], "service at offset 4..6");
        assert_eq!(&bytes[6..8], &[0x02, 0x01], "method at offset 6..8");
        assert_eq!(
            &bytes[8..16],
            &[1, 2, 3, 4, 5, 6, 7, 8],
            "request id at 8..16"
        );
        assert_eq!(
            &bytes[16..20],
            &[0x0a, 0x0b, 0x0c, 0x0d],
            "payload length at 16..20"
        );
        assert_eq!(
            &bytes[20..24],
            &[0x11, 0x12, 0x13, 0x14],
            "deadline at 20..24"
        );
    }

    #[test]
    fn kinds_and_priorities_have_stable_wire_values() {
        let kinds: Vec<u8> = FrameKind::ALL.iter().map(|k| *k as u8).collect();
        assert_eq!(kinds, [1, 2, 3, 4, 5, 6, 7, 8]);
        for kind in FrameKind::ALL {
            assert_eq!(FrameKind::from_u8(kind as u8), Some(kind));
        }
        assert_eq!(FrameKind::from_u8(0), None);
        assert_eq!(FrameKind::from_u8(9), None);
        let prios: Vec<u8> = Priority::ALL.iter().map(|p| *p as u8).collect();
        assert_eq!(prios, [0, 1, 2, 3]);
    }

    #[test]
    fn oversize_is_refused_before_the_payload_arrives() {
        let mut header = sample();
        header.payload_len = 1025;
        let limits = Limits::new(1024).unwrap();
        // Only the header is present: the error comes without waiting for, or
        // allocating, the payload.
        let mut buf = BytesMut::from(&header.encode()[..]);
        assert_eq!(
            decode(&mut buf, limits),
            Err(FrameError::Oversize {
                len: 1025,
                max: 1024,
                request_id: header.request_id
            })
        );
    }

    #[test]
    fn every_bad_header_field_is_a_typed_error() {
        let good = sample().encode();
        let limits = Limits {
            max_payload: MAX_PAYLOAD_CEILING,
        };

        let mut b = good;
        b[0] = 2;
        assert_eq!(
            Header::decode(&b, limits),
            Err(FrameError::UnsupportedVersion { version: 2 })
        );

        let mut b = good;
        b[1] = 0;
        assert_eq!(
            Header::decode(&b, limits),
            Err(FrameError::UnknownKind { kind: 0 })
        );

        let mut b = good;
        b[2] = 0b1000;
        assert_eq!(
            Header::decode(&b, limits),
            Err(FrameError::ReservedFlags { flags: 0b1000 })
        );

        let mut b = good;
        b[4] = 0xee;
        assert!(matches!(
            Header::decode(&b, limits),
            Err(FrameError::UnknownService {
                service: 0xee,
                request_id: 0x0807_0605_0403_0201
            })
        ));

        // A request to the connection pseudo-service is an unknown service.
        let mut b = good;
        b[4] = 0;
        assert!(matches!(
            Header::decode(&b, limits),
            Err(FrameError::UnknownService { .. })
        ));

        // A response carrying a deadline.
        let mut h = sample();
        h.kind = FrameKind::Response;
        assert!(matches!(
            Header::decode(&h.encode(), limits),
            Err(FrameError::InvalidField { field, .. }) if field.starts_with("deadline")
        ));

        // A ping addressed to a service.
        let mut h = sample();
        h.kind = FrameKind::Ping;
        h.deadline_ms = 0;
        assert!(matches!(
            Header::decode(&h.encode(), limits),
            Err(FrameError::InvalidField { field, .. }) if field.starts_with("service")
        ));
    }

    #[test]
    fn incomplete_input_consumes_nothing() {
        let frame = Frame::new(sample(), Bytes::from_static(b"hello"), Limits::default()).unwrap();
        let mut wire = BytesMut::new();
        let mut enc = frame.encode();
        while enc.has_remaining() {
            let chunk = enc.chunk();
            wire.extend_from_slice(chunk);
            let n = chunk.len();
            enc.advance(n);
        }
        for cut in 0..wire.len() {
            let mut partial = BytesMut::from(&wire[..cut]);
            match decode(&mut partial, Limits::default()) {
                Ok(Decoded::Incomplete { needed }) => {
                    assert!(needed >= 1);
                    assert_eq!(partial.len(), cut, "nothing consumed");
                }
                other => panic!("cut at {cut}: {other:?}"),
            }
            assert!(matches!(
                decode_slice(&wire[..cut], Limits::default()),
                Err(FrameError::Truncated { .. })
            ));
        }
        assert_eq!(
            decode(&mut wire, Limits::default()),
            Ok(Decoded::Frame(frame))
        );
        assert!(wire.is_empty());
    }

    #[test]
    fn limits_are_validated() {
        assert_eq!(Limits::new(0).unwrap_err(), LimitsError::Zero);
        assert_eq!(
            Limits::new(MAX_PAYLOAD_CEILING + 1).unwrap_err(),
            LimitsError::AboveCeiling(MAX_PAYLOAD_CEILING + 1)
        );
        assert_eq!(Limits::new(10).map(|l| l.max_payload), Ok(10));
        assert!(
            Frame::new(
                sample(),
                Bytes::from(vec![0; 11]),
                Limits { max_payload: 10 }
            )
            .is_err()
        );
    }
}
