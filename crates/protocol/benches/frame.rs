//! Frame encode + decode: a heartbeat-sized frame and a 1 MiB payload.
//!
//! The 1 MiB bench checks that framing never copies the payload: encoding
//! chains the header with the payload's `Bytes`, and decoding splits the
//! payload off the receive buffer.

#![allow(missing_docs)] // reason: criterion_group! generates undocumented public items.

use std::hint::black_box;

use bytes::{Buf, Bytes, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tern_protocol::frame::{self, Decoded, Frame, Header, Limits};
use tern_protocol::{FrameKind, Priority, ServiceId};

fn header(len: usize) -> Header {
    Header {
        kind: FrameKind::Request,
        priority: Priority::Bulk,
        idempotent: true,
        service: ServiceId::Raft,
        method: 3,
        request_id: 7,
        payload_len: len as u32,
        deadline_ms: 1000,
    }
}

/// Encodes a frame the way a transport writes it, and decodes it the way a
/// transport reads it: the header into a small buffer, the payload received
/// into its own buffer (as a QUIC read hands out chunks), never joined.
fn roundtrip(frame: &Frame, limits: Limits) -> Frame {
    let mut encoded = frame.encode();
    let head: [u8; frame::HEADER_LEN] = encoded.chunk().try_into().expect("header chunk");
    encoded.advance(frame::HEADER_LEN);
    let payload = encoded.copy_to_bytes(encoded.remaining());
    let header = Header::decode(&head, limits).expect("valid header");
    Frame { header, payload }
}

fn bench(c: &mut Criterion) {
    let limits = Limits::default();

    let mut group = c.benchmark_group("frame");
    let small = Frame::new(header(0), Bytes::new(), limits).expect("fits");
    group.bench_function("header_encode_decode", |b| {
        b.iter(|| black_box(roundtrip(black_box(&small), limits)))
    });

    let mut wire = BytesMut::with_capacity(64);
    group.bench_function("small_frame_stream_decode", |b| {
        b.iter(|| {
            wire.extend_from_slice(&small.header.encode());
            match frame::decode(&mut wire, limits) {
                Ok(Decoded::Frame(f)) => black_box(f),
                other => panic!("{other:?}"),
            }
        })
    });

    let mib = Bytes::from(vec![0xa5u8; 1 << 20]);
    let big = Frame::new(header(mib.len()), mib, limits).expect("fits");
    group.throughput(Throughput::Bytes(1 << 20));
    group.bench_function("1mib_encode_decode", |b| {
        b.iter(|| {
            let back = roundtrip(black_box(&big), limits);
            assert_eq!(
                back.payload.as_ptr(),
                big.payload.as_ptr(),
                "payload was copied"
            );
            black_box(back)
        })
    });
    // What the seed measured: a copy of 1 MiB. Run beside ours for a ratio.
    let src = vec![0x5au8; 1 << 20];
    let mut dst = vec![0u8; 1 << 20];
    group.bench_function("1mib_memcpy_baseline", |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(&src));
            black_box(&dst);
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
