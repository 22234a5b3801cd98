//! The one place openraft types are encoded for the wire.
//!
//! Raft messages (votes, append-entries, snapshot metadata, and their
//! responses) travel as postcard: compact, deterministic, and fast enough
//! that a heartbeat costs tens of nanoseconds to encode and decode. Both
//! transports carry the bytes unchanged as the payload of a `Raft` method.
//!
//! Limits: encoding refuses to produce more than [`MAX_MESSAGE_LEN`] bytes
//! (the protocol's default frame payload ceiling), and decoding refuses
//! longer input before looking at it. Decoding never panics on any input
//! (a property test feeds it arbitrary bytes); malformed input is a
//! [`CodecError`]. Trailing bytes after a message are an error, so a
//! message is never silently half-read.
//!
//! [`encode_into`] appends to a caller's buffer through a postcard flavor
//! that writes straight into the `Vec`, so a reused buffer makes encoding
//! allocation-free. [`append`] adds typed functions for AppendEntries with a
//! hand-written fast path for heartbeats that produces the same bytes.

pub mod append;

pub use append::{AppendEntriesRequest, decode_append_entries, encode_append_entries_into};

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Largest encoded Raft message: the protocol's default frame payload
/// ceiling (16 MiB). openraft's append batches are bounded well below it;
/// snapshots travel in chunks, not as one message.
pub const MAX_MESSAGE_LEN: usize = tern_protocol::frame::DEFAULT_MAX_PAYLOAD as usize;

/// Why a message could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The encoding would exceed the limit (nothing useful was written).
    #[error("encoded Raft message would exceed {max} bytes")]
    TooLarge {
        /// The limit in force.
        max: usize,
    },
    /// The input is longer than the limit; it was not decoded.
    #[error("Raft message of {len} bytes exceeds the limit of {max} bytes")]
    InputTooLarge {
        /// Input length.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// The value cannot be encoded (a serde error, e.g. an unsupported type).
    #[error("cannot encode Raft message: {0}")]
    Encode(postcard::Error),
    /// The input is not a valid encoding of the expected message.
    #[error("malformed Raft message: {0}")]
    Malformed(postcard::Error),
    /// The input holds a valid message followed by extra bytes.
    #[error("{extra} unexpected bytes after the Raft message")]
    TrailingBytes {
        /// How many bytes were left over.
        extra: usize,
    },
}

/// A postcard flavor appending to a `Vec` with a length limit.
struct VecFlavor<'a> {
    buf: &'a mut Vec<u8>,
    /// Length the buffer may reach.
    limit: usize,
}

impl postcard::ser_flavors::Flavor for VecFlavor<'_> {
    type Output = ();

    #[inline]
    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        if self.buf.len() + data.len() > self.limit {
            return Err(postcard::Error::SerializeBufferFull);
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }

    #[inline]
    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        if self.buf.len() >= self.limit {
            return Err(postcard::Error::SerializeBufferFull);
        }
        self.buf.push(data);
        Ok(())
    }

    #[inline]
    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// Appends the encoding of `value` to `buf` and returns its length. At
/// most [`MAX_MESSAGE_LEN`] bytes are appended; on error `buf` is restored
/// to its length before the call. Allocation-free when `buf` has room.
#[inline]
pub fn encode_into<T: Serialize + ?Sized>(
    value: &T,
    buf: &mut Vec<u8>,
) -> Result<usize, CodecError> {
    encode_into_with_limit(value, buf, MAX_MESSAGE_LEN)
}

/// [`encode_into`] with another limit on the encoded length.
#[inline]
pub fn encode_into_with_limit<T: Serialize + ?Sized>(
    value: &T,
    buf: &mut Vec<u8>,
    max: usize,
) -> Result<usize, CodecError> {
    let start = buf.len();
    let flavor = VecFlavor {
        limit: start.saturating_add(max),
        buf,
    };
    match postcard::serialize_with_flavor(value, flavor) {
        Ok(()) => Ok(buf.len() - start),
        Err(e) => {
            buf.truncate(start);
            Err(match e {
                postcard::Error::SerializeBufferFull => CodecError::TooLarge { max },
                other => CodecError::Encode(other),
            })
        }
    }
}

/// Encodes `value` into new [`Bytes`].
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Bytes, CodecError> {
    let mut buf = Vec::new();
    encode_into(value, &mut buf)?;
    Ok(Bytes::from(buf))
}

/// Decodes one message that fills `bytes` exactly; input longer than
/// [`MAX_MESSAGE_LEN`] is refused unread.
#[inline]
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    decode_with_limit(bytes, MAX_MESSAGE_LEN)
}

/// [`decode`] with another limit on the input length.
#[inline]
pub fn decode_with_limit<T: DeserializeOwned>(bytes: &[u8], max: usize) -> Result<T, CodecError> {
    if bytes.len() > max {
        return Err(CodecError::InputTooLarge {
            len: bytes.len(),
            max,
        });
    }
    let (value, rest) = postcard::take_from_bytes(bytes).map_err(CodecError::Malformed)?;
    if !rest.is_empty() {
        return Err(CodecError::TrailingBytes { extra: rest.len() });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, VoteRequest};
    use openraft::testing::{blank_ent, log_id};
    use openraft::{EntryPayload, Vote};
    use tern_state::Command;
    use tern_store::{Entry, TypeConfig};

    fn heartbeat() -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new_committed(7, 3),
            prev_log_id: Some(log_id::<TypeConfig>(7, 3, 1234)),
            entries: vec![],
            leader_commit: Some(log_id::<TypeConfig>(7, 3, 1230)),
        }
    }

    #[test]
    fn append_entries_round_trips() {
        let mut req = heartbeat();
        req.entries = vec![
            blank_ent::<TypeConfig>(7, 3, 1235),
            Entry {
                log_id: log_id::<TypeConfig>(7, 3, 1236),
                payload: EntryPayload::Normal(Command::DeleteVm {
                    request_id: "r".into(),
                    vm_id: "vm-9".into(),
                }),
            },
        ];
        let bytes = encode(&req).unwrap();
        let back: AppendEntriesRequest<TypeConfig> = decode(&bytes).unwrap();
        assert_eq!(format!("{back:?}"), format!("{req:?}"));

        let resp = AppendEntriesResponse::<TypeConfig>::Success;
        let back: AppendEntriesResponse<TypeConfig> = decode(&encode(&resp).unwrap()).unwrap();
        assert_eq!(back, resp);

        let vote =
            VoteRequest::<TypeConfig>::new(Vote::new(8, 2), Some(log_id::<TypeConfig>(7, 3, 9)));
        let back: VoteRequest<TypeConfig> = decode(&encode(&vote).unwrap()).unwrap();
        assert_eq!(back, vote);
    }

    #[test]
    fn encode_into_appends_and_reuses_the_buffer() {
        let mut buf = b"head".to_vec();
        let n = encode_into(&heartbeat(), &mut buf).unwrap();
        assert_eq!(buf.len(), 4 + n);
        assert_eq!(&buf[..4], b"head");
        assert_eq!(&buf[4..], &encode(&heartbeat()).unwrap()[..]);
        let capacity = buf.capacity();
        buf.clear();
        encode_into(&heartbeat(), &mut buf).unwrap();
        assert_eq!(buf.capacity(), capacity, "no reallocation");
    }

    #[test]
    fn limits_are_enforced_both_ways() {
        let mut buf = b"keep".to_vec();
        let big = vec![0u8; 100];
        assert_eq!(
            encode_into_with_limit(&big, &mut buf, 50),
            Err(CodecError::TooLarge { max: 50 })
        );
        assert_eq!(buf, b"keep", "a failed encode leaves the buffer as it was");
        let bytes = encode(&big).unwrap();
        assert_eq!(
            decode_with_limit::<Vec<u8>>(&bytes, 50),
            Err(CodecError::InputTooLarge {
                len: bytes.len(),
                max: 50
            })
        );
    }

    #[test]
    fn malformed_and_trailing_input_are_typed_errors() {
        let mut bytes = encode(&heartbeat()).unwrap().to_vec();
        bytes.push(0);
        assert_eq!(
            decode::<AppendEntriesRequest<TypeConfig>>(&bytes).err(),
            Some(CodecError::TrailingBytes { extra: 1 })
        );
        assert!(matches!(
            decode::<AppendEntriesRequest<TypeConfig>>(&bytes[..3]),
            Err(CodecError::Malformed(_))
        ));
        assert!(matches!(
            decode::<AppendEntriesRequest<TypeConfig>>(&[]),
            Err(CodecError::Malformed(_))
        ));
    }
}
