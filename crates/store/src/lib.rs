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
//!   (checksummed records, torn-tail repair, truncation, purge).
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
