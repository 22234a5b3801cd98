//! openraft log storage and state machine on sled, and the Raft type
//! configuration of the whole project. The state it stores is
//! `tern-state`'s [`ClusterState`](tern_state::ClusterState).
//!
//! # Layout
//!
//! - [`types`]: [`TypeConfig`] (declared once for every crate that speaks
//!   Raft, over the replicated model of `tern-state`) and aliases for
//!   openraft's generic types.
//! - [`log_store`]: [`LogStore`], openraft's `RaftLogStorage` on sled;
//!   every write is synced to stable storage before it is acknowledged.
//! - `syncer` (private): the group commit, one thread that runs sled's
//!   flush and `fdatasync` for every write queued since the last one.
//! - [`state_machine`]: [`StateMachineStore`], openraft's
//!   `RaftStateMachine`: the state in memory, snapshots on disk.
//! - [`snapshot`]: the snapshot file format and [`SnapshotFile`], the
//!   snapshot data openraft moves between nodes.
//! - [`error`]: [`StoreError`]; corrupt data is an error naming the key or
//!   file, never a panic.
//!
//! [`open`] opens both halves in a node's data directory.

pub mod error;
pub mod log_store;
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

/// Subdirectory of the data directory holding the sled log database.
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
