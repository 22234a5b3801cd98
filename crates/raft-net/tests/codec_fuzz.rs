//! Property tests of the Raft codec: decoding arbitrary bytes as any Raft
//! message never panics, and encoding then decoding is the identity.

use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, VoteRequest, VoteResponse};
use openraft::testing::log_id;
use openraft::{EntryPayload, Vote};
use proptest::prelude::*;
use tern_raft_net::codec::{decode, encode};
use tern_state::Command;
use tern_store::{Entry, SnapshotMeta, TypeConfig};

/// Cases per property: enough to hit every decoder branch many times,
/// small enough to keep `cargo test` quick.
const CASES: u32 = 2048;

/// Longest arbitrary input tried.
const MAX_INPUT: usize = 512;

fn all_decoders(bytes: &[u8]) {
    let _ = decode::<AppendEntriesRequest<TypeConfig>>(bytes);
    let _ = decode::<AppendEntriesResponse<TypeConfig>>(bytes);
    let _ = decode::<VoteRequest<TypeConfig>>(bytes);
    let _ = decode::<VoteResponse<TypeConfig>>(bytes);
    let _ = decode::<Entry>(bytes);
    let _ = decode::<SnapshotMeta>(bytes);
    let _ = decode::<Vec<Entry>>(bytes);
    let _ = tern_raft_net::codec::decode_append_entries(bytes);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..MAX_INPUT)) {
        all_decoders(&bytes);
    }

    #[test]
    fn decoding_mutated_valid_messages_never_panics(
        term in 0u64..1_000_000,
        node in 0u64..1_000,
        index in 0u64..u64::MAX / 2,
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let req = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(term, node),
            prev_log_id: Some(log_id::<TypeConfig>(term, node, index)),
            entries: vec![Entry {
                log_id: log_id::<TypeConfig>(term, node, index + 1),
                payload: EntryPayload::Normal(Command::DeleteVm {
                    request_id: "req".into(),
                    vm_id: "vm".into(),
                }),
            }],
            leader_commit: Some(log_id::<TypeConfig>(term, node, index)),
        };
        let mut bytes = encode(&req).expect("encodes").to_vec();
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= value;
        }
        all_decoders(&bytes);
    }

    #[test]
    fn vote_requests_round_trip(term in any::<u64>(), node in any::<u64>(), index in any::<u64>(), committed in any::<bool>()) {
        let vote = if committed { Vote::new_committed(term, node) } else { Vote::new(term, node) };
        let req = VoteRequest::<TypeConfig>::new(vote, Some(log_id::<TypeConfig>(term, node, index)));
        let back: VoteRequest<TypeConfig> = decode(&encode(&req).expect("encodes")).expect("decodes");
        prop_assert_eq!(back, req);
    }
}
