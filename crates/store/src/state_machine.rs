//! The Raft state machine: the [`ClusterState`] in memory, made durable by
//! snapshot files.
//!
//! Applying an entry runs the pure [`ClusterState::apply`] under a lock; it
//! does no I/O. What makes the state durable is the pair openraft
//! documents for a state machine kept in memory: the log in sled (with the
//! committed log id saved by [`crate::LogStore`]) and the snapshot files.
//! [`StateMachineStore::open`] restores the last snapshot, and openraft
//! re-applies the committed log after it when the node starts. The cluster
//! state is small (members and VM records), so this costs less than
//! mirroring every write into sled a second time.
//!
//! A snapshot is built by encoding the live state straight into a file
//! under the lock (no copy of the state is made), on a blocking thread.
//! Installing one verifies its checksum, renames it into place, then
//! replaces the state by decoding the file.
//!
//! [`StateMachineStore`] is a cheap handle: the node keeps a clone to read
//! the cluster state ([`StateMachineStore::read`]) while openraft owns
//! another.

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use futures::{Stream, StreamExt};
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine, Snapshot};
use openraft::{EntryPayload, OptionalSend};

use crate::error::StoreError;
use crate::snapshot::{SnapshotDir, SnapshotFile, read_snapshot};
use crate::state::{ClusterState, Response};
use crate::types::{LogId, SnapshotMeta, StoredMembership, TypeConfig};

/// A snapshot as openraft passes it around for this store.
pub type StoreSnapshot = Snapshot<
    openraft::type_config::alias::CommittedLeaderIdOf<TypeConfig>,
    crate::types::NodeId,
    crate::types::Member,
    SnapshotFile,
>;

/// What the lock protects: the state and how far it has applied.
#[derive(Debug, Default)]
struct Applied {
    state: ClusterState,
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
}

/// The state machine handle. Clones share the state.
#[derive(Debug, Clone)]
pub struct StateMachineStore {
    applied: Arc<Mutex<Applied>>,
    snapshots: Arc<SnapshotDir>,
}

/// Builds a snapshot of the state at the time [`RaftSnapshotBuilder::build_snapshot`]
/// runs.
#[derive(Debug)]
pub struct SnapshotBuilder {
    sm: StateMachineStore,
}

fn lock(applied: &Mutex<Applied>) -> Result<MutexGuard<'_, Applied>, StoreError> {
    applied.lock().map_err(|_| StoreError::Poisoned)
}

async fn blocking<T, F>(f: F) -> Result<T, StoreError>
where
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
}

impl StateMachineStore {
    /// Opens the snapshot directory `dir` (creating it), removes unfinished
    /// snapshot files, and restores the state from the current snapshot if
    /// there is one.
    pub fn open(dir: &Path) -> Result<StateMachineStore, StoreError> {
        let snapshots = SnapshotDir::open(dir)?;
        let mut applied = Applied::default();
        if let Some(current) = snapshots.open_current()? {
            let (meta, state) = read_snapshot(&current)?;
            tracing::info!(
                last_log_id = ?meta.last_log_id,
                members = state.members().len(),
                vms = state.vms().len(),
                "state restored from snapshot"
            );
            applied = Applied {
                state,
                last_applied: meta.last_log_id,
                last_membership: meta.last_membership,
            };
        }
        Ok(StateMachineStore {
            applied: Arc::new(Mutex::new(applied)),
            snapshots: Arc::new(snapshots),
        })
    }

    /// Runs `f` on the current cluster state. Keep `f` short: applying
    /// entries waits for it.
    pub fn read<R>(&self, f: impl FnOnce(&ClusterState) -> R) -> Result<R, StoreError> {
        Ok(f(&lock(&self.applied)?.state))
    }

    /// The last applied log id.
    pub fn last_applied(&self) -> Result<Option<LogId>, StoreError> {
        Ok(lock(&self.applied)?.last_applied)
    }

    /// An empty file in the snapshot directory to receive a snapshot from
    /// the leader into. Write the chunks with [`SnapshotFile::write_at`],
    /// then pass it to openraft (`Raft::install_full_snapshot`). A file
    /// never installed is removed at the next open.
    pub fn begin_receiving_snapshot(&self) -> Result<SnapshotFile, StoreError> {
        self.snapshots.create_incoming()
    }

    /// Builds a snapshot of the current state and makes it the current
    /// snapshot.
    pub async fn build_snapshot(&self) -> Result<StoreSnapshot, StoreError> {
        let sm = self.clone();
        blocking(move || {
            let applied = lock(&sm.applied)?;
            let meta = SnapshotMeta {
                last_log_id: applied.last_applied,
                last_membership: applied.last_membership.clone(),
            };
            let file = sm.snapshots.write_current(&meta, &applied.state)?;
            drop(applied);
            tracing::info!(last_log_id = ?meta.last_log_id, "snapshot built");
            Ok(Snapshot {
                meta,
                snapshot: file,
            })
        })
        .await
    }

    /// The current snapshot, if any.
    pub async fn current_snapshot(&self) -> Result<Option<StoreSnapshot>, StoreError> {
        let sm = self.clone();
        blocking(move || {
            // Under the lock, so that a snapshot being installed or built
            // is either fully there or not yet.
            let _applied = lock(&sm.applied)?;
            let Some(file) = sm.snapshots.open_current()? else {
                return Ok(None);
            };
            let meta = file.meta()?;
            Ok(Some(Snapshot {
                meta,
                snapshot: file,
            }))
        })
        .await
    }

    /// Installs `snapshot` as the current snapshot and replaces the state
    /// with it.
    pub async fn install(
        &self,
        meta: SnapshotMeta,
        snapshot: SnapshotFile,
    ) -> Result<(), StoreError> {
        let sm = self.clone();
        blocking(move || {
            let mut applied = lock(&sm.applied)?;
            sm.snapshots.install(&snapshot)?;
            // Drop the old state before decoding the new one, so the two are
            // never in memory together; the new file's checksum has been
            // verified, so decoding it fails only if the disk fails.
            *applied = Applied::default();
            let (file_meta, state) = read_snapshot(&snapshot)?;
            if file_meta != meta {
                tracing::warn!(
                    ?meta,
                    ?file_meta,
                    "installed snapshot's metadata differs from the file's; the file wins"
                );
            }
            *applied = Applied {
                state,
                last_applied: file_meta.last_log_id,
                last_membership: file_meta.last_membership,
            };
            tracing::info!(last_log_id = ?applied.last_applied, "snapshot installed");
            Ok(())
        })
        .await
    }

    /// The directory holding the snapshot files.
    pub fn snapshot_dir(&self) -> &Path {
        self.snapshots.path()
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotFile;

    async fn build_snapshot(&mut self) -> Result<StoreSnapshot, io::Error> {
        Ok(self.sm.build_snapshot().await?)
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotData = SnapshotFile;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let applied = lock(&self.applied)?;
        Ok((applied.last_applied, applied.last_membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let response = {
                let mut applied = lock(&self.applied)?;
                applied.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => Response::Done,
                    EntryPayload::Normal(cmd) => applied.state.apply(cmd),
                    EntryPayload::Membership(membership) => {
                        applied.state.apply_membership(&membership);
                        applied.last_membership =
                            StoredMembership::new(Some(entry.log_id), membership);
                        Response::Done
                    }
                }
            };
            if let Some(responder) = responder {
                responder.send(response);
            }
        }
        Ok(())
    }

    async fn try_create_snapshot_builder(&mut self, _force: bool) -> Option<SnapshotBuilder> {
        Some(SnapshotBuilder { sm: self.clone() })
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        SnapshotBuilder { sm: self.clone() }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotFile,
    ) -> Result<(), io::Error> {
        Ok(self.install(meta.clone(), snapshot).await?)
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<StoreSnapshot>, io::Error> {
        Ok(self.current_snapshot().await?)
    }
}
