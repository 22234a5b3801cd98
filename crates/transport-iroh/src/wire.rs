//! Frames on QUIC streams, and the error codes both ends put on streams and
//! connections.
//!
//! A call is one bidirectional stream: the caller writes one request (or
//! ping) frame and finishes its side; the server answers with one response,
//! error (or pong) frame and finishes. A streaming call carries more frames
//! on its one stream (see [`crate::stream`]). A stream that is reset carries one of
//! the `STREAM_*` codes below, which tell the caller whether its request
//! reached the service.

use std::future::Future;

use bytes::{Bytes, BytesMut};
use iroh::endpoint::{ReadError, RecvStream, SendStream, VarInt, WriteError};
use tern_protocol::frame::{HEADER_LEN, Limits};
use tern_protocol::{Frame, FrameError, FrameKind, Header, Priority};

use crate::metrics;

/// Stream code: the caller abandoned the call (its future was dropped or
/// its deadline passed). The server drops the service's work.
pub const STREAM_CANCELLED: VarInt = VarInt::from_u32(1);
/// Stream code: the server is shutting down and did not run this request.
pub const STREAM_SHUTTING_DOWN: VarInt = VarInt::from_u32(2);
/// Stream code: the frame was malformed; it was not run.
pub const STREAM_MALFORMED: VarInt = VarInt::from_u32(3);
/// Stream code: the frame was larger than the receiver's limit (an error
/// frame saying so precedes it where the request id was known); not run.
pub const STREAM_TOO_LARGE: VarInt = VarInt::from_u32(4);

/// Stream code: the caller's deadline passed while the service worked; the
/// work was dropped. Callers map it to `TimedOut` (the request ran, in
/// part at least).
pub const STREAM_DEADLINE_EXCEEDED: VarInt = VarInt::from_u32(5);

/// Stream code: a streaming call went without progress (no message, or
/// a write held back by flow control) for its idle bound; the end that
/// waited gave up on it. Callers map it to `TimedOut`.
pub const STREAM_IDLE: VarInt = VarInt::from_u32(6);

/// Connection close code: the node is shutting down after draining its
/// calls. Callers map it to `PeerShuttingDown`.
pub const CLOSE_SHUTTING_DOWN: VarInt = VarInt::from_u32(1);
/// Connection close code: the server has too many connections.
pub const CLOSE_TOO_MANY_CONNECTIONS: VarInt = VarInt::from_u32(2);
/// Connection close code: this node rebuilt its endpoint (its socket had
/// died, see [`crate::supervisor`]); the connection belonged to the old
/// one. Mostly local: the old endpoint could no longer send it.
pub const CLOSE_ENDPOINT_REBUILT: VarInt = VarInt::from_u32(3);
/// Connection close code: a ping on the connection went unanswered, so the
/// caller dropped it to dial again (see [`crate::client`]).
pub const CLOSE_PATH_SILENT: VarInt = VarInt::from_u32(4);

/// Largest chunk asked of the QUIC stack per read. Chunks are handed over
/// without copying when a payload arrives in one; 1 MiB bounds the copy
/// otherwise.
const READ_CHUNK: usize = 1 << 20;

/// Quic send priority of a lane: higher is sent first, so control data
/// leaves before replication, normal and bulk data buffered on the same
/// connection.
pub fn quic_priority(priority: Priority) -> i32 {
    match priority {
        Priority::Control => 3,
        Priority::Replication => 2,
        Priority::Normal => 1,
        Priority::Bulk => 0,
    }
}

/// Why no frame could be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadFrameError {
    /// The header is malformed or over the limit.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The stream ended cleanly before a whole frame (`got` bytes read).
    #[error("stream ended after {got} bytes, inside a frame")]
    Eof {
        /// Bytes of the frame that did arrive.
        got: usize,
    },
    /// The stream or its connection failed.
    #[error(transparent)]
    Read(#[from] ReadError),
}

/// Reads one frame. The header is checked against `limits` before the
/// payload is read or allocated.
pub async fn read_frame(recv: &mut RecvStream, limits: Limits) -> Result<Frame, ReadFrameError> {
    let mut raw = [0u8; HEADER_LEN];
    let mut have = 0;
    while have < HEADER_LEN {
        match recv.read(&mut raw[have..]).await? {
            Some(n) => have += n,
            None => return Err(ReadFrameError::Eof { got: have }),
        }
    }
    let header = Header::decode(&raw, limits)?;
    read_payload_after(recv, header).await
}

/// Reads the payload announced by an already decoded (so size-checked)
/// header and returns the whole frame.
pub async fn read_payload_after(
    recv: &mut RecvStream,
    header: Header,
) -> Result<Frame, ReadFrameError> {
    let len = header.payload_len as usize;
    let payload = read_payload(recv, len).await.map_err(|e| match e {
        ReadFrameError::Eof { got } => ReadFrameError::Eof {
            got: HEADER_LEN + got,
        },
        other => other,
    })?;
    metrics::frame_received(len);
    Ok(Frame { header, payload })
}

// Offsets of the fields an error frame echoes, from the layout drawn in
// `tern_protocol::frame` (and pinned by its tests).
const OFF_KIND: usize = 1;
const OFF_FLAGS: usize = 2;
const OFF_PAYLOAD_LEN: usize = 16;
const OFF_DEADLINE: usize = 20;
/// Flag bits an error frame keeps: the priority class.
const FLAG_PRIORITY_MASK: u8 = 0b11;

/// The header of an error frame answering a request whose header could
/// not be decoded (unknown service, oversize): the request's version,
/// service, method and request id are echoed unchanged, so the caller,
/// who knows its own service, can decode it; the kind becomes `Error`,
/// the flags keep only the priority class, the deadline is zero.
pub fn error_header_for_raw(raw: &[u8; HEADER_LEN], payload_len: u32) -> [u8; HEADER_LEN] {
    let mut out = *raw;
    out[OFF_KIND] = FrameKind::Error as u8;
    out[OFF_FLAGS] = raw[OFF_FLAGS] & FLAG_PRIORITY_MASK;
    out[OFF_FLAGS + 1] = 0;
    out[OFF_PAYLOAD_LEN..OFF_PAYLOAD_LEN + 4].copy_from_slice(&payload_len.to_le_bytes());
    out[OFF_DEADLINE..OFF_DEADLINE + 4].copy_from_slice(&[0; 4]);
    out
}

async fn read_payload(recv: &mut RecvStream, len: usize) -> Result<Bytes, ReadFrameError> {
    if len == 0 {
        return Ok(Bytes::new());
    }
    let first = match recv.read_chunk(len.min(READ_CHUNK)).await? {
        Some(chunk) => chunk,
        None => return Err(ReadFrameError::Eof { got: 0 }),
    };
    if first.len() == len {
        return Ok(first);
    }
    let mut buf = BytesMut::with_capacity(len);
    buf.extend_from_slice(&first);
    while buf.len() < len {
        match recv.read_chunk((len - buf.len()).min(READ_CHUNK)).await? {
            Some(chunk) => buf.extend_from_slice(&chunk),
            None => return Err(ReadFrameError::Eof { got: buf.len() }),
        }
    }
    Ok(buf.freeze())
}

/// Consumes the end of a stream whose one frame was read, if the peer's
/// FIN is already here (it usually travels with the frame's last bytes).
/// Without this, dropping the stream would send STOP_SENDING and make the
/// peer answer with RESET_STREAM: two needless frames per call. Never
/// waits; returns whether the stream was seen to end cleanly.
pub fn consume_end(recv: &mut RecvStream) -> bool {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let read = recv.read_chunk(1);
    let mut read = std::pin::pin!(read);
    matches!(
        read.as_mut().poll(&mut cx),
        std::task::Poll::Ready(Ok(None))
    )
}

/// Payloads up to this size are written together with their header in
/// one contiguous write. The QUIC stack copies writes of up to a packet
/// (`noq`'s `MAX_COMBINE`, 1452 bytes) into its send buffer anyway, so
/// handing it the header and a small payload as two `Bytes` cost an
/// allocation for the header and a reallocation of the send buffer for
/// the payload; one write of both costs neither (measured by
/// `benches/allocs.rs`). 1000 bytes keeps the frame under a packet and
/// the stack buffer small; Raft heartbeats, votes and most service calls
/// fit.
const INLINE_PAYLOAD: usize = 1000;

const _: () = assert!(
    HEADER_LEN + INLINE_PAYLOAD <= 1452,
    "an inline frame fits in one packet"
);

/// Writes one frame: a small one in one contiguous write (see
/// `INLINE_PAYLOAD`), a larger one as its header followed by the
/// payload, which is handed over without copying.
pub async fn write_frame(send: &mut SendStream, frame: &Frame) -> Result<(), WriteError> {
    let header = frame.header.encode();
    let len = frame.payload.len();
    if len <= INLINE_PAYLOAD {
        let mut buf = [0u8; HEADER_LEN + INLINE_PAYLOAD];
        buf[..HEADER_LEN].copy_from_slice(&header);
        buf[HEADER_LEN..HEADER_LEN + len].copy_from_slice(&frame.payload);
        send.write_all(&buf[..HEADER_LEN + len]).await?;
    } else {
        send.write_all(&header).await?;
        send.write_chunk(frame.payload.clone()).await?;
    }
    metrics::frame_sent(len);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_protocol::ServiceId;

    #[test]
    fn error_header_echoes_the_request() {
        let request = Header {
            kind: FrameKind::Request,
            priority: Priority::Bulk,
            idempotent: true,
            service: ServiceId::Raft,
            method: 3,
            request_id: 77,
            payload_len: 1 << 30,
            deadline_ms: 500,
        };
        let raw = request.encode();
        let out = error_header_for_raw(&raw, 12);
        let back = Header::decode(&out, Limits::default()).unwrap();
        assert_eq!(
            back,
            Header {
                kind: FrameKind::Error,
                idempotent: false,
                payload_len: 12,
                deadline_ms: 0,
                ..request
            }
        );
    }

    #[test]
    fn lanes_map_to_decreasing_quic_priorities() {
        let p: Vec<i32> = Priority::ALL.iter().map(|p| quic_priority(*p)).collect();
        assert!(p.windows(2).all(|w| w[0] > w[1]), "{p:?}");
    }
}
