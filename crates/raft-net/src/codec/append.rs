//! AppendEntries, the hottest Raft message, with a hand-written fast path
//! for the entry-less requests that heartbeats are.
//!
//! The wire format stays postcard: the fast path writes and reads exactly
//! the bytes the generic postcard path does for a request with no entries
//! (the property tests compare both paths byte for byte and value for
//! value), so either side may use either path. Requests with entries, and
//! any input the fast reader does not accept, go through generic postcard,
//! which also produces the error for malformed input.
//!
//! Layout of an `AppendEntriesRequest<TypeConfig>` in postcard (varints are
//! LEB128, at most 10 bytes for a u64):
//!
//! ```text
//! vote:          term varint, node varint, committed (0 | 1)
//! prev_log_id:   0 | 1 term varint node varint index varint
//! entries:       count varint, entries...
//! leader_commit: 0 | 1 term varint node varint index varint
//! ```

use openraft::impls::leader_id_adv::LeaderId;
use openraft::{LogId, Vote};
use tern_store::TypeConfig;

use super::{CodecError, MAX_MESSAGE_LEN, decode, encode_into};

/// openraft's append-entries request for Tern's type configuration.
pub type AppendEntriesRequest = openraft::raft::AppendEntriesRequest<TypeConfig>;

/// Longest LEB128 encoding of a u64.
const VARINT_MAX: usize = 10;
/// Longest encoding of an entry-less request: a vote (two varints and a
/// bool), two optional log ids (a tag and three varints each) and an entry
/// count of zero.
const HEARTBEAT_MAX_LEN: usize = (2 * VARINT_MAX + 1) + 2 * (1 + 3 * VARINT_MAX) + 1;
/// postcard refuses a tenth varint byte above this (bits past 64).
const LAST_VARINT_BYTE_MAX: u8 = 1;

const _: () = assert!(HEARTBEAT_MAX_LEN <= MAX_MESSAGE_LEN);

/// A fixed buffer the fast encoder fills before one copy into the caller's
/// buffer.
struct Writer {
    buf: [u8; HEARTBEAT_MAX_LEN],
    len: usize,
}

impl Writer {
    #[inline(always)]
    fn byte(&mut self, b: u8) {
        self.buf[self.len] = b;
        self.len += 1;
    }

    #[inline(always)]
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.byte((v as u8) | 0x80);
            v >>= 7;
        }
        self.byte(v as u8);
    }

    #[inline(always)]
    fn log_id(&mut self, id: &Option<LogId<LeaderId<u64, u64>>>) {
        match id {
            None => self.byte(0),
            Some(id) => {
                self.byte(1);
                self.varint(id.leader_id.term);
                self.varint(id.leader_id.node_id);
                self.varint(id.index);
            }
        }
    }
}

/// Appends the encoding of `req` to `buf` and returns its length, as
/// [`encode_into`] does; a request without entries takes the fast path.
#[inline]
pub fn encode_append_entries_into(
    req: &AppendEntriesRequest,
    buf: &mut Vec<u8>,
) -> Result<usize, CodecError> {
    if !req.entries.is_empty() {
        return encode_into(req, buf);
    }
    let mut w = Writer {
        buf: [0; HEARTBEAT_MAX_LEN],
        len: 0,
    };
    w.varint(req.vote.leader_id.term);
    w.varint(req.vote.leader_id.node_id);
    w.byte(u8::from(req.vote.committed));
    w.log_id(&req.prev_log_id);
    w.byte(0); // no entries
    w.log_id(&req.leader_commit);
    buf.extend_from_slice(&w.buf[..w.len]);
    Ok(w.len)
}

/// Reads the fast path's subset of postcard, refusing (with `None`)
/// whatever it does not handle so that generic postcard decides.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    #[inline(always)]
    fn byte(&mut self) -> Option<u8> {
        let b = *self.bytes.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }

    /// postcard's varint rules exactly: up to ten bytes, the tenth at most
    /// [`LAST_VARINT_BYTE_MAX`]. Single-byte values (terms, node ids,
    /// flags) return at once.
    #[inline(always)]
    fn varint(&mut self) -> Option<u64> {
        let first = self.byte()?;
        if first < 0x80 {
            return Some(u64::from(first));
        }
        self.varint_rest(first)
    }

    #[inline]
    fn varint_rest(&mut self, first: u8) -> Option<u64> {
        let mut out = u64::from(first & 0x7f);
        for i in 1..VARINT_MAX - 1 {
            let b = self.byte()?;
            out |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                return Some(out);
            }
        }
        let last = self.byte()?;
        if last > LAST_VARINT_BYTE_MAX {
            return None;
        }
        Some(out | (u64::from(last) << (7 * (VARINT_MAX - 1))))
    }

    #[inline(always)]
    fn bool(&mut self) -> Option<bool> {
        match self.byte()? {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }
    }

    #[inline(always)]
    fn log_id(&mut self) -> Option<Option<LogId<LeaderId<u64, u64>>>> {
        if !self.bool()? {
            return Some(None);
        }
        let term = self.varint()?;
        let node_id = self.varint()?;
        let index = self.varint()?;
        Some(Some(LogId {
            leader_id: LeaderId { term, node_id },
            index,
        }))
    }
}

/// The fast reader: `Some` only for a complete entry-less request that
/// fills `bytes` exactly.
#[inline]
fn decode_heartbeat(bytes: &[u8]) -> Option<AppendEntriesRequest> {
    let mut r = Reader { bytes, pos: 0 };
    let term = r.varint()?;
    let node_id = r.varint()?;
    let committed = r.bool()?;
    let prev_log_id = r.log_id()?;
    if r.varint()? != 0 {
        return None;
    }
    let leader_commit = r.log_id()?;
    if r.pos != bytes.len() {
        return None;
    }
    Some(AppendEntriesRequest {
        vote: Vote {
            leader_id: LeaderId { term, node_id },
            committed,
        },
        prev_log_id,
        entries: Vec::new(),
        leader_commit,
    })
}

/// Decodes an append-entries request, as [`decode`] does; an entry-less
/// request takes the fast path.
#[inline]
pub fn decode_append_entries(bytes: &[u8]) -> Result<AppendEntriesRequest, CodecError> {
    if bytes.len() <= HEARTBEAT_MAX_LEN
        && let Some(req) = decode_heartbeat(bytes)
    {
        return Ok(req);
    }
    decode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::encode;
    use openraft::testing::log_id;
    use proptest::prelude::*;

    fn heartbeat(
        term: u64,
        node: u64,
        committed: bool,
        prev: Option<u64>,
        commit: Option<u64>,
    ) -> AppendEntriesRequest {
        AppendEntriesRequest {
            vote: if committed {
                Vote::new_committed(term, node)
            } else {
                Vote::new(term, node)
            },
            prev_log_id: prev.map(|i| log_id::<TypeConfig>(term, node, i)),
            entries: Vec::new(),
            leader_commit: commit.map(|i| log_id::<TypeConfig>(term.saturating_sub(1), node, i)),
        }
    }

    #[test]
    fn the_longest_heartbeat_fits_the_fast_buffer() {
        let req = heartbeat(u64::MAX, u64::MAX, true, Some(u64::MAX), Some(u64::MAX));
        let mut buf = Vec::new();
        let n = encode_append_entries_into(&req, &mut buf).unwrap();
        assert_eq!(n, HEARTBEAT_MAX_LEN);
        assert_eq!(&buf[..], &encode(&req).unwrap()[..]);
    }

    #[test]
    fn requests_with_entries_take_the_generic_path() {
        let mut req = heartbeat(3, 1, true, Some(9), Some(8));
        req.entries = vec![openraft::testing::blank_ent::<TypeConfig>(3, 1, 10)];
        let mut buf = Vec::new();
        encode_append_entries_into(&req, &mut buf).unwrap();
        assert_eq!(&buf[..], &encode(&req).unwrap()[..]);
        let back = decode_append_entries(&buf).unwrap();
        assert_eq!(format!("{back:?}"), format!("{req:?}"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        /// The fast encoder writes postcard's bytes, and both decoders read
        /// them back to the same request.
        #[test]
        fn fast_and_generic_paths_agree(
            term in any::<u64>(),
            node in any::<u64>(),
            committed in any::<bool>(),
            prev in proptest::option::of(any::<u64>()),
            commit in proptest::option::of(any::<u64>()),
        ) {
            let req = heartbeat(term, node, committed, prev, commit);
            let mut fast = b"prefix".to_vec();
            let n = encode_append_entries_into(&req, &mut fast).unwrap();
            let generic = encode(&req).unwrap();
            prop_assert_eq!(&fast[6..], &generic[..]);
            prop_assert_eq!(n, generic.len());
            let back = decode_heartbeat(&generic).expect("fast path reads a heartbeat");
            prop_assert_eq!(format!("{back:?}"), format!("{req:?}"));
        }

        /// On any input the fast reader accepts, generic postcard agrees.
        #[test]
        fn the_fast_reader_accepts_nothing_postcard_refuses(
            bytes in proptest::collection::vec(any::<u8>(), 0..HEARTBEAT_MAX_LEN + 4)
        ) {
            let generic = decode::<AppendEntriesRequest>(&bytes);
            if let Some(fast) = decode_heartbeat(&bytes) {
                let generic = generic.expect("postcard accepts what the fast path accepts");
                prop_assert_eq!(format!("{fast:?}"), format!("{generic:?}"));
            }
        }

        /// Mutated heartbeats: both paths agree on acceptance and value.
        #[test]
        fn fast_and_generic_readers_agree_on_mutated_heartbeats(
            term in any::<u64>(),
            index in any::<u64>(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let req = heartbeat(term, 7, true, Some(index), Some(index / 2));
            let mut bytes = encode(&req).unwrap().to_vec();
            for (at, value) in flips {
                let i = at.index(bytes.len());
                bytes[i] ^= value;
            }
            let generic = decode::<AppendEntriesRequest>(&bytes);
            let fast = decode_heartbeat(&bytes);
            match (&fast, &generic) {
                (Some(f), Ok(g)) => prop_assert_eq!(format!("{f:?}"), format!("{g:?}")),
                (Some(f), Err(e)) => prop_assert!(false, "fast accepted {f:?}, postcard refused: {e}"),
                (None, _) => {}
            }
        }
    }
}
