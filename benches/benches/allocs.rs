//! Heap allocations per unary call, ours beside the raw baselines.
//!
//! A counting global allocator wraps the system one; each transport's
//! server ([`tern_benches::serve::start`]) and client
//! ([`tern_benches::client::Driver`], the two-process bench's) run in this
//! one process, so a figure is **both ends of one call**: the client's
//! call, the server's accept, dispatch and answer, and what the QUIC or
//! HTTP/2 stack allocates for them. The call is the two-process bench's
//! unary probe: a 64-byte `Raft/AppendEntries` echo on the normal lane
//! (raw iroh: 64 bytes echoed on a bi-stream; raw gRPC: tonic's generated
//! `AppendEntries`).
//!
//! Calls are made one at a time on a warm connection, after a warm-up, so
//! the figure is the steady state; background work of the runtime (QUIC
//! timers, keep-alives) in the same window counts too, which is why the
//! figures are means over many calls. Prints one line per transport:
//! allocations and allocated bytes per call, and ours over the raw
//! baseline. Not a criterion bench (criterion measures time); it accepts
//! and ignores criterion's options, so `cargo xtask bench` runs it beside
//! them, and under `cargo test --benches` it makes a few calls only.

#![allow(clippy::unwrap_used)] // reason: bench set-up; a failure aborts the bench.
#![allow(unsafe_code)] // reason: a global allocator is an `unsafe impl`; it only forwards to `System`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tern_benches::client::Driver;
use tern_benches::kind::Kind;
use tern_benches::serve;

/// The system allocator, counting allocations and their bytes.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static ALLOCATED_BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: every method forwards to `System` unchanged; the counters are
// plain atomics and allocate nothing.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        ALLOCATED_BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        ALLOCATED_BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        ALLOCATED_BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Payload of the unary probe (the two-process bench's).
const PAYLOAD: usize = tern_benches::twoproc::UNARY_PAYLOAD;
/// Calls counted per transport under `--bench`.
const CALLS: u64 = 20_000;
/// Calls counted per transport in test mode (`cargo test --benches`).
const TEST_CALLS: u64 = 50;
/// Calls made before counting, so that pools, lanes and caches are warm.
const WARM_UP: u64 = 1_000;

/// Allocations and bytes per call for `kind`, over `calls` calls.
async fn measure(kind: Kind, calls: u64) -> anyhow::Result<(f64, f64)> {
    let server = serve::start(kind, rand::random()).await?;
    let mut driver = Driver::connect(&server.ready).await?;
    let data = Bytes::from(vec![0x5a; PAYLOAD]);
    for _ in 0..WARM_UP.min(calls * 10) {
        driver.unary(data.clone()).await?;
    }
    let (a0, b0) = (
        ALLOCATIONS.load(Ordering::Relaxed),
        ALLOCATED_BYTES.load(Ordering::Relaxed),
    );
    for _ in 0..calls {
        driver.unary(data.clone()).await?;
    }
    let (a1, b1) = (
        ALLOCATIONS.load(Ordering::Relaxed),
        ALLOCATED_BYTES.load(Ordering::Relaxed),
    );
    driver.close().await;
    server.stop().await;
    Ok((
        (a1 - a0) as f64 / calls as f64,
        (b1 - b0) as f64 / calls as f64,
    ))
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let calls = if bench { CALLS } else { TEST_CALLS };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut figures = Vec::new();
    for kind in Kind::ALL {
        let (allocs, bytes) = rt.block_on(measure(kind, calls)).unwrap();
        figures.push((kind, allocs, bytes));
    }
    let of = |k: Kind| figures.iter().find(|f| f.0 == k).map(|f| f.1).unwrap();
    println!("allocations per unary call ({PAYLOAD} B echo, both ends, mean of {calls} calls):");
    for (kind, allocs, bytes) in &figures {
        let vs = match kind {
            Kind::Iroh => format!("  (raw iroh + {:.1})", allocs - of(Kind::RawIroh)),
            Kind::Grpc => format!("  (raw gRPC + {:.1})", allocs - of(Kind::RawGrpc)),
            Kind::RawIroh | Kind::RawGrpc => String::new(),
        };
        println!("  {kind:<9} {allocs:>7.1} allocations {bytes:>9.0} bytes{vs}");
    }
}
