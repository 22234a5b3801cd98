//! gRPC transport benchmarks, mirroring the iroh transport's so that
//! `cargo xtask bench` shows both side by side:
//!
//! - `grpc/unary/small_payload`: one echo call with a 16-byte payload, on a
//!   warm connection (latency).
//! - `grpc/concurrent/64_callers`: 64 callers sharing one client each make
//!   one call at once; throughput in calls.
//! - `grpc/bulk/64mib`: 64 MiB as 1 MiB `Raft/Snapshot` chunks, 4 in
//!   flight, on the bulk lane; throughput in bytes.
//! - `grpc/control_during_bulk/vote`: a `Raft/Vote` round trip while 64 MiB
//!   bulk transfers run without pause on the same pair of nodes.
//!
//! Each of the first three has a `raw_baseline` beside it: the same calls
//! with tonic's generated client against a bare tonic server (no caller
//! proofs, no handler, no pool), so the transport's own overhead is a ratio
//! measured in the same run. `grpc/unary` also prints p50/p99 of both.
//!
//! Real servers on 127.0.0.1, the conformance suite's test service; the
//! raw baseline is `tern_benches::raw`, the same one `tern-bench transport`
//! measures between two processes.

#![allow(clippy::unwrap_used)] // reason: bench set-up; a failure aborts the bench.
#![allow(missing_docs)] // reason: criterion_group! generates undocumented public items.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures::future::join_all;
use prost::Message;
use tern_benches::raw;
use tern_protocol::catalog::methods;
use tern_protocol::{Call, PeerAddr, Priority, RpcClient, pb};
use tern_transport_conformance::service::TestService;
use tern_transport_grpc::services::raft_client::RaftClient;
use tern_transport_grpc::{GrpcClient, GrpcTransport, ServerConfig};
use tonic::transport::Channel;

/// Callers in the concurrency bench.
const CALLERS: usize = 64;
/// Size of one bulk chunk.
const BULK_CHUNK: usize = 1 << 20;
/// Chunks per bulk iteration (64 MiB).
const BULK_CHUNKS: usize = 64;
/// Bulk chunks in flight at once.
const BULK_PARALLEL: usize = 4;
/// Timeout of every bench call: generous, never expected to hit.
const TIMEOUT: Duration = Duration::from_secs(60);
/// Calls timed one by one for the p50/p99 printout.
const PERCENTILE_SAMPLE: usize = 2000;
/// Starts the raw baseline server (`tern_benches::raw`: tonic's generated
/// Raft service answering directly, over the transport's TLS) and returns
/// a client to it.
async fn raw_baseline() -> RaftClient<Channel> {
    let (url, id) = raw::raw_grpc_server([0x51; 32]).await.unwrap();
    let channel = raw::raw_grpc_channel(&url, id).await.unwrap();
    RaftClient::new(channel)
        .max_decoding_message_size(raw::RAW_MAX)
        .max_encoding_message_size(raw::RAW_MAX)
}

fn percentiles(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    (at(0.50), at(0.99))
}

struct Setup {
    rt: tokio::runtime::Runtime,
    server: Option<GrpcTransport>,
    caller: Option<GrpcTransport>,
    client: Arc<GrpcClient>,
    addr: PeerAddr,
    raw: RaftClient<Channel>,
}

impl Setup {
    fn new() -> Setup {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (server, caller, raw) = rt.block_on(async {
            let any = SocketAddr::from(([127, 0, 0, 1], 0));
            let server = GrpcTransport::bind(
                ServerConfig::new([1; 32], any),
                TestService::default().dispatcher(),
            )
            .await
            .unwrap();
            let caller = GrpcTransport::bind(
                ServerConfig::new([2; 32], any),
                TestService::default().dispatcher(),
            )
            .await
            .unwrap();
            (server, caller, raw_baseline().await)
        });
        let client = caller.client();
        let addr = server.peer_addr();
        Setup {
            rt,
            server: Some(server),
            caller: Some(caller),
            client,
            addr,
            raw,
        }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let (server, caller) = (self.server.take(), self.caller.take());
        self.rt.block_on(async {
            if let Some(c) = caller {
                c.shutdown(Duration::from_secs(5)).await;
            }
            if let Some(s) = server {
                s.shutdown(Duration::from_secs(5)).await;
            }
        });
    }
}

fn echo_call(data: Bytes, priority: Priority) -> Call {
    Call::new(
        methods::RAFT_APPEND_ENTRIES,
        pb::RaftPayload { data }.encode_to_vec().into(),
    )
    .with_timeout(TIMEOUT)
    .with_priority(priority)
}

fn snapshot_chunk(i: usize, data: Bytes) -> pb::SnapshotChunk {
    pb::SnapshotChunk {
        snapshot_id: "bench".into(),
        offset: (i * BULK_CHUNK) as u64,
        data,
        ..Default::default()
    }
}

/// Sends 64 MiB as bulk snapshot chunks through the Tern client.
async fn tern_bulk(client: Arc<dyn RpcClient>, addr: PeerAddr, chunk: Bytes) {
    let sem = Arc::new(tokio::sync::Semaphore::new(BULK_PARALLEL));
    let sends = (0..BULK_CHUNKS).map(|i| {
        let (client, addr, chunk, sem) = (client.clone(), addr.clone(), chunk.clone(), sem.clone());
        tokio::spawn(async move {
            let _permit = sem.acquire().await.unwrap();
            let payload = snapshot_chunk(i, chunk).encode_to_vec().into();
            client
                .call(
                    &addr,
                    Call::new(methods::RAFT_SNAPSHOT, payload).with_timeout(TIMEOUT),
                )
                .await
        })
    });
    for r in join_all(sends).await {
        r.unwrap().unwrap();
    }
}

fn unary(c: &mut Criterion) {
    let s = Setup::new();
    let data = Bytes::from_static(b"0123456789abcdef");
    s.rt.block_on(
        s.client
            .call(&s.addr, echo_call(data.clone(), Priority::Normal)),
    )
    .unwrap();
    let mut group = c.benchmark_group("grpc/unary");
    group.throughput(Throughput::Elements(1));
    group.bench_function("small_payload", |b| {
        b.iter_custom(|iters| {
            s.rt.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    s.client
                        .call(&s.addr, echo_call(data.clone(), Priority::Normal))
                        .await
                        .unwrap();
                }
                started.elapsed()
            })
        });
    });
    group.bench_function("raw_baseline", |b| {
        b.iter_custom(|iters| {
            s.rt.block_on(async {
                let mut raw = s.raw.clone();
                let started = Instant::now();
                for _ in 0..iters {
                    raw.append_entries(pb::RaftPayload { data: data.clone() })
                        .await
                        .unwrap();
                }
                started.elapsed()
            })
        });
    });
    group.finish();
    let (ours, raw) = s.rt.block_on(async {
        let mut raw_client = s.raw.clone();
        let mut ours = Vec::with_capacity(PERCENTILE_SAMPLE);
        let mut raw = Vec::with_capacity(PERCENTILE_SAMPLE);
        for _ in 0..PERCENTILE_SAMPLE {
            let t = Instant::now();
            s.client
                .call(&s.addr, echo_call(data.clone(), Priority::Normal))
                .await
                .unwrap();
            ours.push(t.elapsed());
            let t = Instant::now();
            raw_client
                .append_entries(pb::RaftPayload { data: data.clone() })
                .await
                .unwrap();
            raw.push(t.elapsed());
        }
        (percentiles(ours), percentiles(raw))
    });
    println!(
        "grpc/unary p50/p99 over {PERCENTILE_SAMPLE} calls: tern {:?}/{:?}, raw {:?}/{:?}",
        ours.0, ours.1, raw.0, raw.1
    );
}

fn concurrent(c: &mut Criterion) {
    let s = Setup::new();
    let data = Bytes::from_static(b"0123456789abcdef");
    let client: Arc<dyn RpcClient> = s.client.clone();
    let mut group = c.benchmark_group("grpc/concurrent");
    group.throughput(Throughput::Elements(CALLERS as u64));
    group.bench_function("64_callers", |b| {
        b.iter_custom(|iters| {
            s.rt.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    let calls = (0..CALLERS).map(|_| {
                        let (client, addr, data) = (client.clone(), s.addr.clone(), data.clone());
                        tokio::spawn(async move {
                            client.call(&addr, echo_call(data, Priority::Normal)).await
                        })
                    });
                    for r in join_all(calls).await {
                        r.unwrap().unwrap();
                    }
                }
                started.elapsed()
            })
        });
    });
    group.bench_function("raw_baseline", |b| {
        b.iter_custom(|iters| {
            s.rt.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    let calls = (0..CALLERS).map(|_| {
                        let (mut raw, data) = (s.raw.clone(), data.clone());
                        tokio::spawn(
                            async move { raw.append_entries(pb::RaftPayload { data }).await },
                        )
                    });
                    for r in join_all(calls).await {
                        r.unwrap().unwrap();
                    }
                }
                started.elapsed()
            })
        });
    });
    group.finish();
}

fn bulk(c: &mut Criterion) {
    let s = Setup::new();
    let chunk = Bytes::from(vec![0x42u8; BULK_CHUNK]);
    let client: Arc<dyn RpcClient> = s.client.clone();
    let mut group = c.benchmark_group("grpc/bulk");
    group.sample_size(10);
    group.throughput(Throughput::Bytes((BULK_CHUNK * BULK_CHUNKS) as u64));
    group.bench_function("64mib", |b| {
        b.iter_custom(|iters| {
            s.rt.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    tern_bulk(client.clone(), s.addr.clone(), chunk.clone()).await;
                }
                started.elapsed()
            })
        });
    });
    group.bench_function("raw_baseline", |b| {
        b.iter_custom(|iters| {
            s.rt.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    let sem = Arc::new(tokio::sync::Semaphore::new(BULK_PARALLEL));
                    let sends = (0..BULK_CHUNKS).map(|i| {
                        let (mut raw, chunk, sem) = (s.raw.clone(), chunk.clone(), sem.clone());
                        tokio::spawn(async move {
                            let _permit = sem.acquire().await.unwrap();
                            raw.snapshot(snapshot_chunk(i, chunk)).await
                        })
                    });
                    for r in join_all(sends).await {
                        r.unwrap().unwrap();
                    }
                }
                started.elapsed()
            })
        });
    });
    group.finish();
}

fn control_during_bulk(c: &mut Criterion) {
    let s = Setup::new();
    let chunk = Bytes::from(vec![0x42u8; BULK_CHUNK]);
    let client: Arc<dyn RpcClient> = s.client.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let background = {
        let (client, addr, chunk, stop) = (client.clone(), s.addr.clone(), chunk, stop.clone());
        s.rt.spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                tern_bulk(client.clone(), addr.clone(), chunk.clone()).await;
            }
        })
    };
    let mut group = c.benchmark_group("grpc/control_during_bulk");
    group.sample_size(20);
    group.bench_function("vote", |b| {
        b.iter_custom(|iters| {
            s.rt.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    let call = Call::new(methods::RAFT_VOTE, Bytes::new()).with_timeout(TIMEOUT);
                    client.call(&s.addr, call).await.unwrap();
                }
                started.elapsed()
            })
        });
    });
    group.finish();
    stop.store(true, Ordering::SeqCst);
    s.rt.block_on(background).unwrap();
}

criterion_group!(benches, unary, concurrent, bulk, control_during_bulk);
criterion_main!(benches);
