//! gRPC transport benchmarks, mirroring the iroh transport's so that
//! `cargo xtask bench` shows both side by side:
//!
//! - `grpc/unary/small_payload`: one echo call with a 16-byte payload, on a
//!   warm connection (latency).
//! - `grpc/concurrent/64_callers`: 64 callers sharing one client each make
//!   one call at once; throughput in calls.
//! - `grpc/bulk/64mib`: 64 MiB as 1 MiB `Raft/Snapshot` chunks, 4 in
//!   flight, on the bulk lane; throughput in bytes.
//!
//! Real servers on 127.0.0.1, the conformance suite's test service.

#![allow(clippy::unwrap_used)] // reason: bench set-up; a failure aborts the bench.
#![allow(missing_docs)] // reason: criterion_group! generates undocumented public items.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures::future::join_all;
use prost::Message;
use tern_protocol::catalog::methods;
use tern_protocol::{Call, PeerAddr, Priority, RpcClient, pb};
use tern_transport_conformance::service::TestService;
use tern_transport_grpc::{GrpcClient, GrpcTransport, ServerConfig};

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

struct Setup {
    rt: tokio::runtime::Runtime,
    server: Option<GrpcTransport>,
    caller: Option<GrpcTransport>,
    client: Arc<GrpcClient>,
    addr: PeerAddr,
}

impl Setup {
    fn new() -> Setup {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (server, caller) = rt.block_on(async {
            let any = SocketAddr::from(([127, 0, 0, 1], 0));
            let server = GrpcTransport::start(
                ServerConfig::new([1; 32], any),
                TestService::default().dispatcher(),
            )
            .await
            .unwrap();
            let caller = GrpcTransport::start(
                ServerConfig::new([2; 32], any),
                TestService::default().dispatcher(),
            )
            .await
            .unwrap();
            (server, caller)
        });
        let client = caller.client();
        let addr = server.addr();
        Setup {
            rt,
            server: Some(server),
            caller: Some(caller),
            client,
            addr,
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
    group.finish();
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
                    let sem = Arc::new(tokio::sync::Semaphore::new(BULK_PARALLEL));
                    let sends = (0..BULK_CHUNKS).map(|i| {
                        let (client, addr, chunk, sem) =
                            (client.clone(), s.addr.clone(), chunk.clone(), sem.clone());
                        tokio::spawn(async move {
                            let _permit = sem.acquire().await.unwrap();
                            let payload = pb::SnapshotChunk {
                                snapshot_id: "bench".into(),
                                offset: (i * BULK_CHUNK) as u64,
                                data: chunk,
                                ..Default::default()
                            }
                            .encode_to_vec()
                            .into();
                            client
                                .call(
                                    &addr,
                                    Call::new(methods::RAFT_SNAPSHOT, payload)
                                        .with_timeout(TIMEOUT),
                                )
                                .await
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

criterion_group!(benches, unary, concurrent, bulk);
criterion_main!(benches);
