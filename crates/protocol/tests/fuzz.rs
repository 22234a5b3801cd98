//! Property tests and the stable-toolchain fuzz campaign for the decoder.
//!
//! - Every frame kind round-trips through encode and both decoders.
//! - Arbitrary bytes never make a decoder panic, and never make it allocate
//!   more than the configured payload limit (an allocation-counting global
//!   allocator checks that).
//! - Arbitrary bytes cut at arbitrary points decode to the same frames as
//!   the whole input (streaming is split-invariant).
//! - The frames of a streaming call, arbitrary or valid, checked by
//!   [`StreamRules`] on either side: every break of the rules is a typed
//!   [`StreamViolation`] (never a panic), the stream stays over after it,
//!   and a well-formed call is accepted message by message, in order.
//!
//! The default run is short. `cargo test -p tern-protocol --features fuzz
//! --test fuzz` runs the long campaign (`TERN_FUZZ_CASES`, default one
//! million cases per property), which is how this crate is fuzzed on the
//! stable toolchain; cargo-fuzz would need nightly.

#![allow(unsafe_code)] // reason: the counting allocator must implement GlobalAlloc, which is unsafe by definition; it only forwards to System.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::{Buf, Bytes, BytesMut};
use proptest::prelude::*;
use tern_protocol::frame::{self, Decoded, Frame, FrameError, HEADER_LEN, Header, Limits};
use tern_protocol::stream::{StreamEvent, StreamRules, StreamSide, StreamViolation};
use tern_protocol::{FrameKind, Priority, ServiceId};

/// Forwards to the system allocator and remembers, per thread, the largest
/// single allocation made while tracking is on.
struct Counting;

thread_local! {
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: the thread-locals may be gone while a thread exits.
    let _ = TRACKING.try_with(|t| {
        if t.get() {
            let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
        }
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns the largest single allocation it made.
fn largest_allocation(f: impl FnOnce()) -> usize {
    LARGEST.with(|l| l.set(0));
    TRACKING.with(|t| t.set(true));
    f();
    TRACKING.with(|t| t.set(false));
    LARGEST.with(|l| l.get())
}

/// The one small allocation `bytes` makes when it first splits a
/// `Vec`-backed `BytesMut` (its shared-storage header), whatever the
/// payload's size; the payload itself is never copied by `decode`.
const BYTES_BOOKKEEPING: usize = 64;

fn cases() -> u32 {
    if cfg!(feature = "fuzz") {
        std::env::var("TERN_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_000_000)
    } else {
        2_000
    }
}

fn arb_kind() -> impl Strategy<Value = FrameKind> {
    prop::sample::select(FrameKind::ALL.to_vec())
}

fn arb_priority() -> impl Strategy<Value = Priority> {
    prop::sample::select(Priority::ALL.to_vec())
}

fn arb_service() -> impl Strategy<Value = ServiceId> {
    prop::sample::select(ServiceId::SERVICES.to_vec())
}

/// A valid frame of any kind.
fn arb_frame() -> impl Strategy<Value = Frame> {
    (
        arb_kind(),
        arb_priority(),
        any::<bool>(),
        arb_service(),
        any::<u16>(),
        any::<u64>(),
        any::<u32>(),
        prop::collection::vec(any::<u8>(), 0..512),
    )
        .prop_map(
            |(kind, priority, idempotent, service, method, request_id, deadline, payload)| {
                let connection = kind.is_connection_level();
                let header = Header {
                    kind,
                    priority,
                    idempotent,
                    service: if connection {
                        ServiceId::Connection
                    } else {
                        service
                    },
                    method: if connection { 0 } else { method },
                    request_id,
                    payload_len: 0,
                    deadline_ms: if kind == FrameKind::Request {
                        deadline
                    } else {
                        0
                    },
                };
                Frame::new(header, Bytes::from(payload), Limits::default())
                    .expect("small payload fits")
            },
        )
}

fn to_wire(frame: &Frame) -> Vec<u8> {
    let mut encoded = frame.encode();
    let mut out = Vec::with_capacity(encoded.remaining());
    while encoded.has_remaining() {
        let chunk = encoded.chunk();
        out.extend_from_slice(chunk);
        let n = chunk.len();
        encoded.advance(n);
    }
    out
}

/// Bytes that are mostly valid headers with one field disturbed, plus plain
/// noise: reaches deeper decoder paths than noise alone.
fn arb_input() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..128),
        (arb_frame(), any::<usize>(), any::<u8>()).prop_map(|(f, at, byte)| {
            let mut wire = to_wire(&f);
            let at = at % HEADER_LEN;
            wire[at] = byte;
            wire
        }),
        (arb_frame(), any::<u32>()).prop_map(|(f, len)| {
            let mut wire = to_wire(&f);
            wire[16..20].copy_from_slice(&len.to_le_bytes());
            wire
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn every_frame_kind_round_trips(frame in arb_frame()) {
        let wire = to_wire(&frame);
        prop_assert_eq!(wire.len(), frame.encoded_len());
        let (back, used) = frame::decode_slice(&wire, Limits::default()).expect("valid frame decodes");
        prop_assert_eq!(used, wire.len());
        prop_assert_eq!(&back, &frame);
        let mut buf = BytesMut::from(&wire[..]);
        prop_assert_eq!(frame::decode(&mut buf, Limits::default()), Ok(Decoded::Frame(frame)));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn arbitrary_bytes_never_panic_nor_allocate_past_the_limit(input in arb_input(), max in 1u32..4096) {
        let limits = Limits::new(max).expect("valid limit");
        let mut outcome = None;
        let largest = largest_allocation(|| {
            outcome = Some(frame::decode_slice(&input, limits));
        });
        prop_assert!(largest <= max as usize, "allocated {} bytes with a limit of {}", largest, max);
        if let Some(Err(FrameError::Oversize { len, max: m, .. })) = outcome {
            prop_assert!(len > m);
        }
        // The streaming decoder sees the same verdict without allocating
        // (the buffer is the caller's).
        let mut buf = BytesMut::from(&input[..]);
        let largest = largest_allocation(|| { let _ = frame::decode(&mut buf, limits); });
        prop_assert!(largest <= max as usize + BYTES_BOOKKEEPING, "allocated {} bytes with a limit of {}", largest, max);
    }

    #[test]
    fn stream_rules_type_every_violation_and_stay_over(
        input in prop::collection::vec(arb_input(), 0..12),
        frames in prop::collection::vec(arb_frame(), 0..12),
        request_id in 0u64..4,
        messages_allowed in any::<bool>(),
        max in 0u32..600,
    ) {
        // Frames decoded from arbitrary bytes, then valid frames of any
        // kind with ids near the stream's own: both sides check them all.
        let mut headers = Vec::new();
        for bytes in &input {
            if let Ok((f, _)) = frame::decode_slice(bytes, Limits::default()) {
                headers.push(f.header);
            }
        }
        headers.extend(frames.iter().map(|f| Header { request_id: f.header.request_id % 4, ..f.header }));
        for side in [StreamSide::Caller, StreamSide::Server] {
            let mut rules = StreamRules::new(side, request_id, messages_allowed, max);
            let mut over = false;
            for header in &headers {
                let verdict = rules.check(header);
                if over {
                    prop_assert_eq!(verdict, Err(StreamViolation::AfterEnd { kind: header.kind }));
                    continue;
                }
                match verdict {
                    Ok(StreamEvent::Accepted) => prop_assert_eq!(side, StreamSide::Caller),
                    Ok(StreamEvent::Message) => {
                        prop_assert!(messages_allowed);
                        prop_assert_eq!(header.kind, FrameKind::StreamData);
                        prop_assert_eq!(header.request_id, request_id);
                        prop_assert!(header.payload_len <= max);
                    }
                    Ok(_) => over = true,
                    Err(StreamViolation::UnknownRequest { got, expected, .. }) => {
                        prop_assert_ne!(got, expected);
                        over = true;
                    }
                    Err(StreamViolation::Oversize { len, max: m }) => {
                        prop_assert!(len > m);
                        over = true;
                    }
                    Err(_) => over = true,
                }
                prop_assert_eq!(rules.is_over(), over);
            }
        }
    }

    #[test]
    fn a_well_formed_stream_is_accepted_in_order(
        request_id in any::<u64>(),
        lens in prop::collection::vec(0u32..1000, 0..32),
        failed in any::<bool>(),
    ) {
        let header = |kind, payload_len| Header {
            kind,
            priority: Priority::Normal,
            idempotent: false,
            service: ServiceId::Vm,
            method: 8,
            request_id,
            payload_len,
            deadline_ms: 0,
        };
        let mut caller = StreamRules::new(StreamSide::Caller, request_id, true, 1000);
        let mut server = StreamRules::new(StreamSide::Server, request_id, true, 1000);
        prop_assert_eq!(caller.check(&header(FrameKind::Response, 0)), Ok(StreamEvent::Accepted));
        for len in &lens {
            prop_assert_eq!(caller.check(&header(FrameKind::StreamData, *len)), Ok(StreamEvent::Message));
            prop_assert_eq!(server.check(&header(FrameKind::StreamData, *len)), Ok(StreamEvent::Message));
        }
        prop_assert_eq!(server.check(&header(FrameKind::StreamEnd, 0)), Ok(StreamEvent::End));
        let (last, event) = if failed {
            (FrameKind::Error, StreamEvent::Failed)
        } else {
            (FrameKind::StreamEnd, StreamEvent::End)
        };
        prop_assert_eq!(caller.check(&header(last, 0)), Ok(event));
        prop_assert!(caller.is_over() && server.is_over());
    }

    #[test]
    fn streaming_is_split_invariant(frames in prop::collection::vec(arb_frame(), 1..8), cuts in prop::collection::vec(any::<usize>(), 0..8)) {
        let wire: Vec<u8> = frames.iter().flat_map(to_wire).collect();
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (wire.len() + 1)).collect();
        cuts.push(wire.len());
        cuts.sort_unstable();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut fed = 0;
        for cut in cuts {
            buf.extend_from_slice(&wire[fed..cut]);
            fed = cut;
            while let Decoded::Frame(f) = frame::decode(&mut buf, Limits::default()).expect("valid stream") {
                got.push(f);
            }
        }
        prop_assert_eq!(got, frames);
        prop_assert!(buf.is_empty());
    }
}

#[test]
fn the_allocation_counter_sees_allocations() {
    let seen = largest_allocation(|| drop(std::hint::black_box(vec![0u8; 10_000])));
    assert!(seen >= 10_000, "counter saw {seen}");
}
