//! Streaming calls: one open bidirectional stream, messages echoed, iroh
//! against gRPC against the raw baselines, each with 1 KiB and 64 KiB
//! messages.
//!
//! - `stream/rate_{1kib,64kib}/{iroh,grpc,raw_iroh,raw_grpc}`: messages per
//!   second on one stream, pipelined (the caller sends a batch while it
//!   reads the echoes), throughput in messages.
//! - `stream/round_trip_{1kib,64kib}/...`: one message and its echo on an
//!   open stream: the per-message latency (criterion's median is the p50;
//!   the p50 and p99 of a timed sample are printed beside it).
//!
//! Ours: `Raft/AppendStream` of the conformance test service in echo mode,
//! through [`RpcClient::open_stream`]. Raw iroh: one QUIC stream of a bare
//! endpoint, messages length-prefixed, echoed. Raw gRPC: tonic's generated
//! `Raft/AppendStream` echoing the request stream, over the same TLS.
//! Real endpoints and servers on 127.0.0.1, in this one process.

#![allow(clippy::unwrap_used)] // reason: bench set-up; a failure aborts the bench.
#![allow(missing_docs)] // reason: criterion_group! generates undocumented public items.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use iroh::endpoint::{RecvStream, SendStream};
use iroh::protocol::Router;
use iroh::{EndpointAddr, SecretKey};
use prost::Message;
use tern_benches::raw::{
    RAW_MAX, RAW_STREAM_ALPN, RawStreamEcho, raw_endpoint, raw_grpc_channel, raw_grpc_server,
    raw_stream_read, raw_stream_write,
};
use tern_benches::stats::Latencies;
use tern_protocol::catalog::methods;
use tern_protocol::{RpcClient, StreamCall, StreamReceiver, StreamSender, pb};
use tern_transport_conformance::service::TestService;
use tern_transport_grpc::services::raft_client::RaftClient;
use tern_transport_grpc::{GrpcTransport, ServerConfig};
use tern_transport_iroh::{IrohConfig, IrohTransport};
use tokio::runtime::Runtime;
use tokio::sync::mpsc;

/// Message sizes measured.
const SIZES: [(usize, &str); 2] = [(1024, "1kib"), (64 * 1024, "64kib")];
/// Messages per pipelined iteration, by size: about 1 MiB either way.
fn batch(size: usize) -> usize {
    (1 << 20) / size
}
/// Round trips timed one by one for the p50/p99 printout.
const PERCENTILE_SAMPLE: usize = 1000;
/// Bounds of the benched streams: never expected to hit.
const BOUND: Duration = Duration::from_secs(60);

/// One open stream, whatever carries it: send a message, read one.
enum Open {
    Ours(StreamSender, StreamReceiver),
    RawIroh(SendStream, RecvStream),
    RawGrpc(
        mpsc::Sender<pb::RaftPayload>,
        tonic::Streaming<pb::RaftPayload>,
    ),
}

impl Open {
    async fn send(&mut self, message: &Bytes) {
        match self {
            Open::Ours(sender, _) => sender
                .send(
                    pb::RaftPayload {
                        data: message.clone(),
                    }
                    .encode_to_vec()
                    .into(),
                )
                .await
                .unwrap(),
            Open::RawIroh(send, _) => raw_stream_write(send, message.clone()).await.unwrap(),
            Open::RawGrpc(tx, _) => tx
                .send(pb::RaftPayload {
                    data: message.clone(),
                })
                .await
                .unwrap(),
        }
    }

    async fn receive(&mut self) -> usize {
        match self {
            Open::Ours(_, receiver) => {
                let bytes = receiver.next().await.unwrap().unwrap();
                pb::RaftPayload::decode(bytes).unwrap().data.len()
            }
            Open::RawIroh(_, recv) => raw_stream_read(recv).await.unwrap().len(),
            Open::RawGrpc(_, answers) => answers.message().await.unwrap().unwrap().data.len(),
        }
    }

    /// Sends `n` messages while reading their `n` echoes.
    async fn pipeline(&mut self, message: &Bytes, n: usize) {
        // The two directions of one stream, driven together.
        let (mut sent, mut read) = (0, 0);
        while read < n {
            if sent < n && sent - read < 8 {
                self.send(message).await;
                sent += 1;
            } else {
                assert_eq!(self.receive().await, message.len());
                read += 1;
            }
        }
    }
}

/// What keeps the servers of one kind running.
#[allow(dead_code)] // reason: held only to keep servers alive.
enum Keep {
    Iroh(IrohTransport, IrohTransport),
    Grpc(GrpcTransport, GrpcTransport),
    Raw(Router, iroh::Endpoint),
    None,
}

async fn open(kind: &str) -> (Open, Keep) {
    let echo_request = || {
        let first = pb::RaftPayload {
            data: Bytes::from_static(b"echo"),
        };
        StreamCall::new(methods::RAFT_APPEND_STREAM, first.encode_to_vec().into())
            .with_open_timeout(BOUND)
            .with_idle_timeout(BOUND)
    };
    match kind {
        "iroh" => {
            let handler = TestService::default().dispatcher();
            let server = IrohTransport::bind(IrohConfig::new(rand::random()), handler.clone())
                .await
                .unwrap();
            let client = IrohTransport::bind(IrohConfig::new(rand::random()), handler)
                .await
                .unwrap();
            let stream = client
                .client()
                .open_stream(&server.peer_addr(), echo_request())
                .await
                .unwrap();
            (
                Open::Ours(stream.sender.unwrap(), stream.receiver),
                Keep::Iroh(server, client),
            )
        }
        "grpc" => {
            let handler = TestService::default().dispatcher();
            let listen = "127.0.0.1:0".parse().unwrap();
            let server =
                GrpcTransport::bind(ServerConfig::new(rand::random(), listen), handler.clone())
                    .await
                    .unwrap();
            let client = GrpcTransport::bind(ServerConfig::new(rand::random(), listen), handler)
                .await
                .unwrap();
            let stream = client
                .client()
                .open_stream(&server.peer_addr(), echo_request())
                .await
                .unwrap();
            (
                Open::Ours(stream.sender.unwrap(), stream.receiver),
                Keep::Grpc(server, client),
            )
        }
        "raw_iroh" => {
            let key: [u8; 32] = rand::random();
            let server = raw_endpoint(Some(key)).await.unwrap();
            let socket = *server.bound_sockets().first().unwrap();
            let router = Router::builder(server)
                .accept(RAW_STREAM_ALPN, RawStreamEcho)
                .spawn();
            let client = raw_endpoint(None).await.unwrap();
            let target =
                EndpointAddr::new(SecretKey::from_bytes(&key).public()).with_ip_addr(socket);
            let conn = client.connect(target, RAW_STREAM_ALPN).await.unwrap();
            let (send, recv) = conn.open_bi().await.unwrap();
            (Open::RawIroh(send, recv), Keep::Raw(router, client))
        }
        _ => {
            let (url, id) = raw_grpc_server(rand::random()).await.unwrap();
            let channel = raw_grpc_channel(&url, id).await.unwrap();
            let mut client = RaftClient::new(channel)
                .max_decoding_message_size(2 * RAW_MAX)
                .max_encoding_message_size(2 * RAW_MAX);
            let (tx, rx) = mpsc::channel(tern_protocol::stream::STREAM_HANDOVER_MESSAGES);
            let answers = client
                .append_stream(tokio_stream_of(rx))
                .await
                .unwrap()
                .into_inner();
            (Open::RawGrpc(tx, answers), Keep::None)
        }
    }
}

/// A receiver as a stream of requests, for tonic's generated client.
fn tokio_stream_of(
    rx: mpsc::Receiver<pb::RaftPayload>,
) -> impl futures::Stream<Item = pb::RaftPayload> + Send + 'static {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) })
}

const KINDS: [&str; 4] = ["iroh", "grpc", "raw_iroh", "raw_grpc"];

fn streams(c: &mut Criterion) {
    let rt = Arc::new(Runtime::new().unwrap());
    for (size, label) in SIZES {
        let message = Bytes::from(vec![0x42u8; size]);
        let n = batch(size);
        let mut rate = c.benchmark_group(format!("stream/rate_{label}"));
        rate.throughput(Throughput::Elements(n as u64));
        rate.sample_size(10);
        for kind in KINDS {
            let (mut stream, keep) = rt.block_on(open(kind));
            rate.bench_function(kind, |b| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let started = Instant::now();
                        for _ in 0..iters {
                            stream.pipeline(&message, n).await;
                        }
                        started.elapsed()
                    })
                });
            });
            drop(stream);
            drop(keep);
        }
        rate.finish();

        let mut round_trip = c.benchmark_group(format!("stream/round_trip_{label}"));
        round_trip.sample_size(10);
        for kind in KINDS {
            let (mut stream, keep) = rt.block_on(open(kind));
            round_trip.bench_function(kind, |b| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let started = Instant::now();
                        for _ in 0..iters {
                            stream.send(&message).await;
                            stream.receive().await;
                        }
                        started.elapsed()
                    })
                });
            });
            let mut latencies = Latencies::new();
            rt.block_on(async {
                for _ in 0..PERCENTILE_SAMPLE {
                    let started = Instant::now();
                    stream.send(&message).await;
                    stream.receive().await;
                    latencies.record(started.elapsed());
                }
            });
            println!(
                "stream/round_trip_{label}/{kind}: p50 {:.1} µs, p99 {:.1} µs over {PERCENTILE_SAMPLE} messages",
                latencies.percentile(50.0).unwrap_or(f64::NAN) / 1e3,
                latencies.percentile(99.0).unwrap_or(f64::NAN) / 1e3,
            );
            drop(stream);
            drop(keep);
        }
        round_trip.finish();
    }
}

criterion_group!(benches, streams);
criterion_main!(benches);
