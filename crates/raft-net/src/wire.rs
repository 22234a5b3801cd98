//! How Raft messages ride in the `Raft` service's protobuf envelopes.
//!
//! The `.proto` schema carries Raft messages as opaque bytes: `Raft/Vote`
//! and `Raft/AppendEntries` take and return a `RaftPayload { data }`, and
//! `Raft/Snapshot` takes a `SnapshotChunk` and returns a `RaftPayload`. The
//! bytes inside are the [`codec`]'s encoding of openraft's own
//! types. The gRPC transport decodes and re-encodes the envelope, so every
//! payload must be a valid protobuf message; iroh carries it unchanged.
//!
//! `Raft/Vote` is the Control-lane method, so it carries every control
//! message openraft sends, tagged by a [`ControlRequest`]: votes, pre-votes
//! and leadership transfers. Snapshot chunks are answered with a
//! [`SnapshotAck`].
//!
//! Envelopes are written around the codec's output without a copy: the
//! codec encodes after room reserved for the protobuf field header, which
//! is then filled in front of it.

use bytes::Bytes;
use prost::Message;
use serde::{Deserialize, Serialize};
use tern_protocol::pb;
use tern_store::TypeConfig;

use crate::codec::{self, CodecError};

/// openraft's vote request for Tern's configuration.
pub type VoteRequest = openraft::raft::VoteRequest<TypeConfig>;
/// openraft's vote response for Tern's configuration.
pub type VoteResponse = openraft::raft::VoteResponse<TypeConfig>;
/// openraft's leadership-transfer notice for Tern's configuration.
pub type TransferLeaderRequest = openraft::raft::TransferLeaderRequest<TypeConfig>;
/// openraft's answer to a leadership-transfer notice.
pub type TransferLeaderResponse = openraft::raft::TransferLeaderResponse<TypeConfig>;
/// openraft's answer to an installed snapshot.
pub type SnapshotResponse = openraft::raft::SnapshotResponse<TypeConfig>;
/// openraft's append-entries response for Tern's configuration.
pub type AppendEntriesResponse = openraft::raft::AppendEntriesResponse<TypeConfig>;

/// Bytes in front of the codec's output in a `RaftPayload`: the field tag
/// (one byte) and the length as a varint (at most five bytes for a `u32`).
pub const ENVELOPE_OVERHEAD: usize = 1 + 5;

/// The largest codec message that fits a call's payload once wrapped:
/// the protocol's frame payload limit less the envelope.
pub const MAX_WRAPPED_MESSAGE: usize =
    tern_protocol::frame::DEFAULT_MAX_PAYLOAD as usize - ENVELOPE_OVERHEAD;

const _: () = assert!(MAX_WRAPPED_MESSAGE <= codec::MAX_MESSAGE_LEN);
const _: () = assert!(MAX_WRAPPED_MESSAGE as u64 <= u32::MAX as u64);

/// The protobuf tag of `RaftPayload.data` (field 1, length-delimited).
const DATA_TAG: u8 = 0x0a;

/// A control message: the payload of `Raft/Vote`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound = "")]
pub enum ControlRequest {
    /// A candidate asks for a vote.
    Vote(VoteRequest),
    /// A follower asks whether it would get a vote (no state changes).
    PreVote(VoteRequest),
    /// The leader hands leadership to the receiver.
    TransferLeader(TransferLeaderRequest),
}

/// The answer to a [`ControlRequest`], variant for variant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound = "")]
pub enum ControlResponse {
    /// Answer to [`ControlRequest::Vote`] or [`ControlRequest::PreVote`].
    Vote(VoteResponse),
    /// Answer to [`ControlRequest::TransferLeader`].
    TransferLeader(TransferLeaderResponse),
}

/// The answer to one snapshot chunk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound = "")]
pub enum SnapshotAck {
    /// Stored; send the chunk at `next_offset`.
    Continue {
        /// Bytes received so far.
        next_offset: u64,
    },
    /// The transfer is over: installed after the last chunk, or refused
    /// early because the receiver has a higher vote.
    Done(SnapshotResponse),
}

/// Wraps what `encode` appends to a buffer in a `RaftPayload`, without
/// copying it. `encode` gets at most [`MAX_WRAPPED_MESSAGE`] bytes.
pub fn wrap_with(
    encode: impl FnOnce(&mut Vec<u8>) -> Result<usize, CodecError>,
) -> Result<Bytes, CodecError> {
    let mut buf = vec![0u8; ENVELOPE_OVERHEAD];
    let len = encode(&mut buf)?;
    if len > MAX_WRAPPED_MESSAGE {
        return Err(CodecError::TooLarge {
            max: MAX_WRAPPED_MESSAGE,
        });
    }
    let mut head = [0u8; ENVELOPE_OVERHEAD];
    head[0] = DATA_TAG;
    let mut n = 1;
    let mut v = len as u64;
    while v >= 0x80 {
        head[n] = (v as u8) | 0x80;
        v >>= 7;
        n += 1;
    }
    head[n] = v as u8;
    n += 1;
    let start = ENVELOPE_OVERHEAD - n;
    buf[start..ENVELOPE_OVERHEAD].copy_from_slice(&head[..n]);
    Ok(Bytes::from(buf).slice(start..))
}

/// Encodes `value` with the codec and wraps it in a `RaftPayload`.
pub fn wrap<T: Serialize + ?Sized>(value: &T) -> Result<Bytes, CodecError> {
    wrap_with(|buf| codec::encode_into_with_limit(value, buf, MAX_WRAPPED_MESSAGE))
}

/// Why a received envelope could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// The bytes are not the expected protobuf message.
    #[error("malformed envelope: {0}")]
    Protobuf(String),
    /// The Raft message inside does not decode.
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// The codec bytes inside a `RaftPayload` (a zero-copy slice of `bytes`).
pub fn unwrap_bytes(bytes: Bytes) -> Result<Bytes, EnvelopeError> {
    pb::RaftPayload::decode(bytes)
        .map(|p| p.data)
        .map_err(|e| EnvelopeError::Protobuf(e.to_string()))
}

/// Decodes the Raft message inside a `RaftPayload`.
pub fn unwrap<T: serde::de::DeserializeOwned>(bytes: Bytes) -> Result<T, EnvelopeError> {
    let data = unwrap_bytes(bytes)?;
    Ok(codec::decode(&data)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::Vote;

    #[test]
    fn envelopes_are_valid_protobuf_of_every_length() {
        for len in [0usize, 1, 127, 128, 16_383, 16_384, 300_000] {
            let value = vec![7u8; len];
            let wrapped = wrap(&value).unwrap();
            let decoded = pb::RaftPayload::decode(wrapped.clone()).unwrap();
            assert_eq!(decoded.data, codec::encode(&value).unwrap());
            // prost's own encoding is byte-identical.
            assert_eq!(
                &wrapped[..],
                &pb::RaftPayload { data: decoded.data }.encode_to_vec()[..]
            );
            let back: Vec<u8> = unwrap(wrapped).unwrap();
            assert_eq!(back, value);
        }
    }

    #[test]
    fn control_messages_round_trip() {
        let req = ControlRequest::Vote(VoteRequest::new(Vote::new(3, 1), None));
        let back: ControlRequest = unwrap(wrap(&req).unwrap()).unwrap();
        assert_eq!(back, req);
        assert!(matches!(
            unwrap::<ControlRequest>(Bytes::from_static(b"\x0a\x01\xff")),
            Err(EnvelopeError::Codec(_))
        ));
        assert!(matches!(
            unwrap::<ControlRequest>(Bytes::from_static(b"\xff\xff")),
            Err(EnvelopeError::Protobuf(_))
        ));
    }
}
