//! openraft log storage (segment files, with sled for the vote) and state
//! machine, and the Raft type
//! configuration of the whole project. The state it stores is
//! `tern-state`'s [`ClusterState`](tern_state::ClusterState).
//!
//! # Layout
//!
//! - [`types`]: [`TypeConfig`] (declared once for every crate that speaks
//!   Raft, over the replicated model of `tern-state`) and aliases for
//!   openraft's generic types.
//! - [`log_store`]: [`LogStore`], openraft's `RaftLogStorage`: entries in
//!   segment files, the vote and log pointers in a small sled database;
//!   every write is synced to stable storage before it is acknowledged.
//! - [`segments`]: the append-only segment files holding the entries
//!   (checksummed records, torn-tail repair, truncation, purge), and the
//!   newest entries kept in memory for reading back.
//! - `syncer` (private): the group commit, one thread that `fdatasync`s
//!   every file written since its last sync, for every write queued
//!   meanwhile.
//! - [`state_machine`]: [`StateMachineStore`], openraft's
//!   `RaftStateMachine`: the state in memory, snapshots on disk.
//! - [`snapshot`]: the snapshot file format and [`SnapshotFile`], the
//!   snapshot data openraft moves between nodes.
//! - [`error`]: [`StoreError`]; corrupt data is an error naming the key or
//!   file, never a panic.
//!
//! [`open`] opens both halves in a node's data directory.
//!
//! # Why the log's entries left sled (measured)
//!
//! The Raft issue lets the log move to a store built for it if sled cannot
//! reach etcd's figures. Measured on the project machine (2 cores, load 6
//! to 8 from concurrent builds, so absolute rates are low; release build),
//! `perf record -F 2000` on the three `tern` processes of `tern-bench
//! cluster --quick` during its 1-writer gRPC run (about 450 commits/s):
//!
//! | thread | share of the cluster's CPU |
//! | --- | --- |
//! | tokio workers (transport, openraft, services) | 50 % |
//! | sled's I/O pool, 7 threads (`sled-io-N`) | 34 % |
//! | the group commit (`tern-log-sync`: sled flush + `fdatasync`) | 10 % |
//!
//! About 2.7 ms of CPU per commit over three nodes, a third of it in
//! sled's I/O pool: every flush seals an I/O buffer and hands its write to
//! sled's thread pool, whose queue wakes **every** idle thread
//! (`Condvar::notify_all` in sled 0.34's `threadpool.rs`, seven kept
//! waiting); six go back to sleep. Their samples are wake-ups and timed
//! waits (`read_tsc`, futexes), not disk work. The disk itself is fast
//! here (4 KiB `pwrite` + `fdatasync`: p50 0.2 ms). On two cores that CPU
//! is a large part of what Tern's commit rates lose to etcd (1.5 to 2
//! times ahead in `cargo xtask bench`). A log file of our own
//! (append-only segments, checksummed records, one `fdatasync` per group
//! commit, no thread pool) removes that third: that is [`segments`], and
//! sled keeps only the vote and the log pointers, written at elections
//! and purges. The figures after the change are in `cargo xtask bench`'s
//! cluster section.
//!
//! # Where a 1-writer commit's time goes (measured)
//!
//! Each step of a commit logs a `trace` event under the target
//! `tern_commit_path` (off unless enabled). `TERN_NODE_RUST_LOG=
//! warn,tern_commit_path=trace tern-bench cluster --only grpc --writers 1
//! --run-secs 15 --throughput-only --keep-logs DIR` runs the nodes with
//! them; pairing each put's events by log index across the three nodes'
//! logs (same clock) gives the breakdown below. Release (`bench`) build,
//! gRPC between nodes, the project's 2-core machine with load 4 from two
//! other engineers' builds: 503 commits/s, 7,547 puts. Medians (p90) in
//! µs, steps on the commit's critical path in order:
//!
//! | step | p50 | p90 |
//! | --- | ---: | ---: |
//! | leader: `Cluster/MetaPut` handler → openraft → `append` (`pwrite`) | 32 | 59 |
//! | leader: append → replication batch sent on the follower's stream | 55 | 120 |
//! | wire, leader → follower (stream message, TLS, HTTP/2, task wake-ups) | 212 | 407 |
//! | follower: received → `append` | 34 | 56 |
//! | follower: append → the sync thread takes it (thread wake-up) | 94 | 264 |
//! | follower: `fdatasync` | 279 | 678 |
//! | follower: synced → answer sent (callback, core, stream) | 77 | 314 |
//! | wire, follower → leader | 129 | 380 |
//! | leader: quorum reached → entry applied (core, state machine task) | 157 | 390 |
//! | leader: applied → `client_write` returns (responder wake-up) | 54 | 164 |
//! | leader: → answer handed to the transport | 5 | 7 |
//! | **leader: request in → answer out** | **1,200** | **1,705** |
//! | client and gRPC both ways (answer out → next request in) | 631 | 960 |
//!
//! Off the critical path: the leader's own sync (wake-up 60, `fdatasync`
//! 340) ends about 380 µs before the first follower's answer arrives.
//!
//! Read: the disk is about a quarter of a commit (one `fdatasync`, 280 to
//! 340 µs on this shared disk; etcd pays one per member too). The rest is
//! hops between tasks and threads: four transport crossings (two each way
//! for the client, two for replication) at 130 to 630 µs each, and five
//! wake-ups inside the nodes at 50 to 160 µs each. On two cores shared by
//! three nodes, the client and other builds, every hop waits for a core,
//! so CPU spent per commit anywhere lengthens every hop. The first fix
//! was therefore CPU per commit that did nothing for the commit: openraft
//! publishes its full metrics on every pass of its core loop (several per
//! entry), and five tasks per node followed them, two of them waking the
//! health publisher and the VM reconciler (a pass over the node's VMs) for
//! every entry on every node. They now follow openraft's server metrics
//! (role, leader, membership) at once and the indexes on a timer
//! (`tern_cluster::consensus::STATUS_PROGRESS_EVERY`,
//! `tern_raft_net::metrics::PROGRESS_GAUGES_EVERY`). Not done yet: the
//! transport hops themselves (the client's 631 µs round trip on loopback
//! is the largest single item) and the sync thread's wake-up.
//!
//! Measured after that change (same machine, load 2.3 to 3.4, 10 s runs of
//! `tern-bench cluster --only grpc --writers 1 --run-secs 10
//! --throughput-only`, old and new binaries alternating): 862 → 902 and
//! 716 → 787 commits/s. With 64 writers (`--quick --only grpc,iroh
//! --writers 64 --steady-secs 15`, load 3.4 to 4.3): 8,092 → 10,647
//! commits/s over gRPC and 7,529 → 8,711 over iroh in the loaded window.
//!
//! Measured again against etcd (same command with `--only grpc,iroh
//! --run-secs 10`, otherwise idle machine, tracing on, which costs about
//! 10%: 937 commits/s over gRPC, 848 over iroh). Medians in µs, gRPC
//! (iroh):
//!
//! | step | p50 |
//! | --- | ---: |
//! | leader: put received → appended | 20 (20) |
//! | leader: appended → batch sent | 40 (44) |
//! | wire, leader → follower | 101 (103) |
//! | follower: received → appended → sync thread takes it | 26 + 41 (27 + 42) |
//! | follower: `fdatasync` | 145 (156) |
//! | follower: synced → answer sent | 61 (64) |
//! | wire, follower → leader | 61 (69) |
//! | leader: answer → applied → `client_write` returns | 89 + 40 (94 + 35) |
//! | **leader: request in → answer out** | **714 (764)** |
//! | client and transport both ways | 323 (384) |
//!
//! etcd 3.4 on the same machine commits a 1-writer put in 808 µs (p50),
//! Tern in 931 (gRPC) to 1,012 µs (iroh): the disk is a fifth of the
//! path, and the rest is hops between threads, tasks and processes at 20
//! to 100 µs each, on two cores of a VM where a wake-up is dear (`perf
//! record -a` puts the kernel's wake-up path, `try_to_wake_up` and
//! `finish_task_switch`, at the top of the leader's profile). A runtime
//! with one worker per node (`TOKIO_WORKER_THREADS=1`) gains 4 to 9% with
//! one writer and loses 12 to 19% with 64, so it is not the answer;
//! fewer hops are.
//!
//! Fewer wake-ups and less CPU per commit, found by counting syscalls
//! per commit on the leader (`strace -c -f -p PID` during a 1-writer
//! run) and profiling it at 256 writers (`perf record -g`):
//!
//! - `tern run`'s main thread was woken about seven times per commit
//!   (9,114 futex waits in 3 s at 1,237 commits): it waited on Raft's
//!   running state and on a demotion by following openraft's full
//!   metrics, which change several times per entry. The status watch
//!   and the transport policy controller were woken per entry too. All
//!   now follow the server metrics and look at the rest on a timer
//!   (`tern_cluster::node::FAILURE_CHECK_EVERY`,
//!   `tern_services::policy::POLICY_CHECK_EVERY`): futex calls per commit
//!   on the leader 20 → 6.
//! - openraft reads every new entry back three times on the leader (once
//!   per follower to replicate it, once to apply it): three `pread`s,
//!   checksums and decodes per commit. The log's newest entries now stay
//!   in memory ([`segments::TAIL_ENTRIES`]).
//! - glibc's malloc and free were 21% of the leader's CPU at 256
//!   writers; the `tern` binary now allocates with jemalloc (figures in
//!   its `main.rs`).
//!
//! CPU per commit, all three nodes, 1 writer over gRPC (`/proc/PID/stat`
//! over 10 s of a 20 s run): 1.34 ms before the first two, 1.08 ms after.
//! Commits per second, old and new binaries alternating with etcd in the
//! same runs (`tern-bench cluster --only grpc,iroh,etcd --writers 1,64
//! --run-secs 10 --throughput-only`, load 0.9 to 5 on a host that was
//! noisy that day): 1 writer, gRPC 930 and 874 → 1,083 and 1,196, iroh 826
//! and 868 → 972 and 1,151, etcd 954 to 1,105. The side-by-side at
//! every writer count: `tern-bench cluster --tern target/release/tern
//! --out FILE` (it runs etcd too).

pub mod error;
pub mod log_store;
pub mod segments;
pub mod snapshot;
pub mod state_machine;
mod syncer;
pub mod types;

use std::path::Path;

pub use error::StoreError;
pub use log_store::{LogReader, LogStore};
pub use snapshot::SnapshotFile;
pub use state_machine::{StateMachineStore, StoreSnapshot};
pub use syncer::MAX_PENDING_SYNCS;
pub use types::{Entry, LogId, Membership, SnapshotMeta, StoredMembership, TypeConfig, Vote};

/// Subdirectory of the data directory holding the Raft log (its segment
/// files and the sled database of the vote).
pub const LOG_DIR: &str = "raft-log";
/// Subdirectory of the data directory holding snapshot files.
pub const SNAPSHOT_DIR: &str = "raft-snapshots";

/// Opens the Raft log and the state machine under `data_dir`
/// (`raft-log/` and `raft-snapshots/`), creating them if absent.
pub fn open(data_dir: &Path) -> Result<(LogStore, StateMachineStore), StoreError> {
    let log = LogStore::open(&data_dir.join(LOG_DIR))?;
    let sm = StateMachineStore::open(&data_dir.join(SNAPSHOT_DIR))?;
    Ok((log, sm))
}
