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
//! A snapshot is built from a consistent view without stalling applies:
//! the state is cloned under the apply lock (a memory copy, far shorter
//! than encoding and syncing), the lock is released, and the copy is
//! encoded, written and synced on a blocking thread while entries keep
//! applying. Snapshot file operations (build, install, reading the
//! current one) take a second lock of their own, so a build that finishes
//! after a newer snapshot was installed keeps the newer one. Installing a
//! snapshot verifies its checksum, renames it into place, then replaces
//! the state by decoding the file.
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
use crate::snapshot::{SnapshotDir, SnapshotFile, Verify, read_snapshot};
use crate::types::{LogId, SnapshotMeta, StoredMembership, TypeConfig};
use tern_state::{ClusterState, Response};

/// A snapshot as openraft passes it around for this store.
pub type StoreSnapshot = Snapshot<
    openraft::type_config::alias::CommittedLeaderIdOf<TypeConfig>,
    tern_state::NodeId,
    tern_state::Member,
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
    /// The last applied log index, sent after every batch of applied
    /// entries and every snapshot install: what readers that follow the
    /// state (a VM watch) wake on.
    changes: Arc<tokio::sync::watch::Sender<u64>>,
    /// Serialises snapshot file operations (taken before `applied` when
    /// both are needed, never while `applied` is held).
    snapshot_io: Arc<Mutex<()>>,
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
            let (meta, state) = read_snapshot(&current, Verify::Checksum)?;
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
        let index = applied.last_applied.map_or(0, |id| id.index);
        Ok(StateMachineStore {
            changes: Arc::new(tokio::sync::watch::channel(index).0),
            applied: Arc::new(Mutex::new(applied)),
            snapshot_io: Arc::new(Mutex::new(())),
            snapshots: Arc::new(snapshots),
        })
    }

    /// Runs `f` on the current cluster state. Keep `f` short: applying
    /// entries waits for it.
    pub fn read<R>(&self, f: impl FnOnce(&ClusterState) -> R) -> Result<R, StoreError> {
        Ok(f(&lock(&self.applied)?.state))
    }

    /// A watch of the last applied log index: it changes after every
    /// batch of applied entries and after a snapshot is installed (the
    /// state may then have moved in any way), so a reader of the state can
    /// wait for news instead of polling. It holds no state itself: read
    /// the state with [`StateMachineStore::read`] once woken.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn announce(&self, index: Option<LogId>) {
        self.changes.send_replace(index.map_or(0, |id| id.index));
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
            let started = std::time::Instant::now();
            // A consistent view: the state and how far it has applied,
            // copied together, then the apply lock is free again.
            let (meta, state) = {
                let applied = lock(&sm.applied)?;
                let meta = SnapshotMeta {
                    last_log_id: applied.last_applied,
                    last_membership: applied.last_membership.clone(),
                };
                (meta, applied.state.clone())
            };
            let _io = sm.snapshot_io.lock().map_err(|_| StoreError::Poisoned)?;
            if let Some(current) = sm.snapshots.open_current()? {
                let current_meta = current.meta()?;
                if current_meta.last_log_id >= meta.last_log_id {
                    tracing::info!(last_log_id = ?current_meta.last_log_id, "a snapshot as new is current; not replaced");
                    return Ok(Snapshot {
                        meta: current_meta,
                        snapshot: current,
                    });
                }
            }
            let file = sm.snapshots.write_current(&meta, &state)?;
            metrics::histogram!(tern_protocol::metric_names::STORE_SNAPSHOT_BUILD_SECONDS)
                .record(started.elapsed().as_secs_f64());
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            metrics::gauge!(tern_protocol::metric_names::STORE_SNAPSHOT_LAST_BUILT)
                .set(now.as_secs_f64());
            tracing::info!(last_log_id = ?meta.last_log_id, millis = started.elapsed().as_millis(), "snapshot built");
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
            // Under the snapshot lock, so that a snapshot being installed
            // or built is either fully there or not yet.
            let _io = sm.snapshot_io.lock().map_err(|_| StoreError::Poisoned)?;
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
            // The file must be the snapshot openraft means: refuse before
            // anything is replaced.
            let file_meta = snapshot.meta()?;
            if file_meta != meta {
                return Err(StoreError::CorruptSnapshot {
                    path: snapshot.path().to_owned(),
                    reason: format!(
                        "file holds the snapshot of {:?}, expected {:?}",
                        file_meta.last_log_id, meta.last_log_id
                    ),
                });
            }
            let _io = sm.snapshot_io.lock().map_err(|_| StoreError::Poisoned)?;
            let mut applied = lock(&sm.applied)?;
            sm.snapshots.install(&snapshot)?;
            // Drop the old state before decoding the new one, so the two are
            // never in memory together; the file's checksum has just been
            // verified, so decoding it fails only if the disk fails.
            *applied = Applied::default();
            let (file_meta, state) = read_snapshot(&snapshot, Verify::Skip)?;
            *applied = Applied {
                state,
                last_applied: file_meta.last_log_id,
                last_membership: file_meta.last_membership,
            };
            tracing::info!(last_log_id = ?applied.last_applied, "snapshot installed");
            let index = applied.last_applied;
            drop(applied);
            sm.announce(index);
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
        let mut last = None;
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            last = Some(entry.log_id);
            let response = {
                let mut applied = lock(&self.applied)?;
                applied.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => Response::Done,
                    EntryPayload::Normal(cmd) => applied.state.apply_at(entry.log_id.index, cmd),
                    EntryPayload::Membership(membership) => {
                        applied.state.apply_membership(membership.nodes());
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
        if last.is_some() {
            tracing::trace!(target: "tern_commit_path", last = last.map_or(0, |l| l.index), "applied");
            self.announce(last);
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

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use futures::stream;
    use openraft::testing::log_id;
    use tern_protocol::{PeerAddr, PeerId};

    use super::*;
    use crate::types::{Entry, Membership};
    use tern_state::{Capacity, Member};
    use tern_state::{Command, VmRecord};

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    fn entries() -> Vec<Entry> {
        let mut addr = PeerAddr::new(PeerId::from_bytes([1; 32]));
        addr.grpc = Some("https://127.0.0.1:7001".into());
        let member = Member::new(
            addr,
            Capacity {
                vcpus: 2,
                memory_mib: 1024,
            },
        );
        let membership =
            Membership::new(vec![BTreeSet::from([1])], BTreeMap::from([(1, member)])).unwrap();
        let mut out = vec![Entry {
            log_id: log_id::<TypeConfig>(1, 1, 1),
            payload: EntryPayload::Membership(membership),
        }];
        for i in 2..=40u64 {
            out.push(Entry {
                log_id: log_id::<TypeConfig>(1, 1, i),
                payload: EntryPayload::Normal(Command::PutVm {
                    request_id: format!("r{i}"),
                    vm: Box::new(VmRecord {
                        id: format!("vm-{i}"),
                        spec: tern_state::VmSpec {
                            name: format!("name-{i}"),
                            ..Default::default()
                        },
                        ..Default::default()
                    }),
                }),
            });
        }
        out
    }

    async fn apply_all(sm: &mut StateMachineStore, entries: Vec<Entry>) {
        sm.apply(stream::iter(entries.into_iter().map(|e| Ok((e, None)))))
            .await
            .unwrap();
    }

    #[test]
    fn a_snapshot_restores_the_state_on_open_and_on_install() {
        let leader_dir = tempfile::tempdir().unwrap();
        let follower_dir = tempfile::tempdir().unwrap();
        runtime().block_on(async {
            let mut sm = StateMachineStore::open(leader_dir.path()).unwrap();
            apply_all(&mut sm, entries()).await;
            let before = sm.read(|s| s.clone()).unwrap();
            let snap = sm.build_snapshot().await.unwrap();
            assert_eq!(snap.meta.last_log_id, Some(log_id::<TypeConfig>(1, 1, 40)));
            drop(sm);

            // Reopening restores it.
            let mut sm = StateMachineStore::open(leader_dir.path()).unwrap();
            assert_eq!(sm.read(|s| s.clone()).unwrap(), before);
            assert_eq!(sm.applied_state().await.unwrap().0, snap.meta.last_log_id);

            // A follower receives it chunk by chunk and installs it.
            let follower = StateMachineStore::open(follower_dir.path()).unwrap();
            let incoming = follower.begin_receiving_snapshot().unwrap();
            let mut offset = 0;
            let mut chunk = [0u8; 100];
            loop {
                let n = snap.snapshot.read_at(offset, &mut chunk).unwrap();
                if n == 0 {
                    break;
                }
                incoming.write_at(offset, &chunk[..n]).unwrap();
                offset += n as u64;
            }
            follower.install(snap.meta.clone(), incoming).await.unwrap();
            assert_eq!(follower.read(|s| s.clone()).unwrap(), before);
            let current = follower.current_snapshot().await.unwrap().unwrap();
            assert_eq!(current.meta, snap.meta);
            let leftovers: Vec<_> = std::fs::read_dir(follower_dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(
                leftovers,
                vec![std::ffi::OsString::from(crate::snapshot::CURRENT)]
            );
        });
    }

    #[test]
    fn a_corrupt_snapshot_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        runtime().block_on(async {
            let mut sm = StateMachineStore::open(dir.path()).unwrap();
            apply_all(&mut sm, entries()).await;
            let snap = sm.build_snapshot().await.unwrap();

            // A received snapshot with a flipped byte is not installed.
            let other = tempfile::tempdir().unwrap();
            let follower = StateMachineStore::open(other.path()).unwrap();
            let incoming = follower.begin_receiving_snapshot().unwrap();
            let len = snap.snapshot.len().unwrap();
            let mut bytes = vec![0u8; len as usize];
            snap.snapshot.read_at(0, &mut bytes).unwrap();
            bytes[len as usize / 2] ^= 0x40;
            incoming.write_at(0, &bytes).unwrap();
            let err = follower
                .install(snap.meta.clone(), incoming)
                .await
                .unwrap_err();
            assert!(matches!(err, StoreError::CorruptSnapshot { .. }), "{err}");
            assert!(follower.current_snapshot().await.unwrap().is_none());

            // A damaged current snapshot fails the open, naming the file.
            drop(sm);
            let path = dir.path().join(crate::snapshot::CURRENT);
            std::fs::write(&path, &bytes).unwrap();
            let err = StateMachineStore::open(dir.path()).unwrap_err();
            assert!(err.to_string().contains("current.snap"), "{err}");
            assert!(err.to_string().contains("checksum"), "{err}");
            std::fs::write(&path, b"short").unwrap();
            assert!(StateMachineStore::open(dir.path()).is_err());
        });
    }

    #[test]
    fn a_snapshot_whose_file_is_not_the_announced_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        runtime().block_on(async {
            let mut sm = StateMachineStore::open(dir.path()).unwrap();
            apply_all(&mut sm, entries()).await;
            let snap = sm.build_snapshot().await.unwrap();
            let other = tempfile::tempdir().unwrap();
            let follower = StateMachineStore::open(other.path()).unwrap();
            let mut wrong = snap.meta.clone();
            wrong.last_log_id = Some(log_id::<TypeConfig>(1, 1, 41));
            let err = follower.install(wrong, snap.snapshot).await.unwrap_err();
            assert!(err.to_string().contains("expected"), "{err}");
            assert!(follower.current_snapshot().await.unwrap().is_none());
        });
    }

    /// Any string a write within the request limit can carry decodes from
    /// a snapshot: the scratch buffer used to be 1 MiB, so one such string
    /// made the snapshot undecodable and the node unable to restart.
    #[test]
    fn a_snapshot_with_a_string_as_long_as_a_whole_request_reopens() {
        let dir = tempfile::tempdir().unwrap();
        runtime().block_on(async {
            let mut sm = StateMachineStore::open(dir.path()).unwrap();
            let mut all = entries();
            let long = "x".repeat(tern_state::limits::MAX_REQUEST_BYTES - 256);
            assert!(
                long.len() > 1024 * 1024,
                "longer than the old scratch buffer"
            );
            all.push(Entry {
                log_id: log_id::<TypeConfig>(1, 1, 41),
                payload: EntryPayload::Normal(Command::PutMeta {
                    request_id: "long".into(),
                    key: "k".into(),
                    value: "v".into(),
                }),
            });
            if let Some(Entry {
                payload: EntryPayload::Normal(Command::PutVm { vm, .. }),
                ..
            }) = all.get_mut(1)
            {
                vm.spec.kernel_cmdline = long.clone();
            }
            apply_all(&mut sm, all).await;
            let before = sm.read(|s| s.clone()).unwrap();
            sm.build_snapshot().await.unwrap();
            drop(sm);
            let sm = StateMachineStore::open(dir.path()).unwrap();
            assert_eq!(sm.read(|s| s.clone()).unwrap(), before);
            let cmdline = sm
                .read(|s| s.vm("vm-2").map(|v| v.spec.kernel_cmdline.len()))
                .unwrap();
            assert_eq!(cmdline, Some(long.len()));
        });
    }

    #[test]
    fn oversized_incoming_chunks_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sm = StateMachineStore::open(dir.path()).unwrap();
        let incoming = sm.begin_receiving_snapshot().unwrap();
        let err = incoming
            .write_at(crate::snapshot::MAX_SNAPSHOT_BYTES, b"x")
            .unwrap_err();
        assert!(matches!(err, StoreError::SnapshotTooLarge { .. }));
    }
}
