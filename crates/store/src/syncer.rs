//! Group commit for the Raft log: one thread that makes the log's writes
//! durable, many writes per sync.
//!
//! Writers put their changes into the log's files (segment `pwrite`s, or
//! sled's in-memory meta tree) and then [`Syncer::submit`] a completion:
//! an openraft `IOFlushed` callback (appends, which openraft lets finish
//! later) or a channel a caller awaits (votes, purges). The thread takes
//! every completion queued, runs one sync for all of them (the log store's
//! sync: `fdatasync` of every segment file written since the last sync,
//! and sled's flush plus `fdatasync` of its data file when the meta tree
//! changed), and completes them in the order they were submitted; writes
//! submitted while a sync runs share the next one. A completion is
//! submitted after its write, and the sync collects the files to sync
//! after it has taken the completions, so every completion's write is
//! covered by the sync that completes it. So openraft's core loop never
//! waits for the disk, and under load one sync covers many appends.
//!
//! Each sync's time is recorded in `tern_store_sync_seconds`: a slow disk
//! shows there first.
//!
//! A failed sync fails every completion of its group and every later one:
//! after a failed `fsync` the kernel may have dropped the pages it could
//! not write, so retrying would report success for lost data.

use std::path::Path;
use std::sync::mpsc;
use std::time::Instant;

use openraft::storage::IOFlushed;
use tokio::sync::oneshot;

use crate::error::StoreError;
use crate::types::TypeConfig;

/// Completions that may wait for the sync thread at once. A bound, not a
/// tuning knob: openraft keeps its own bound on writes in flight, far
/// below this; a full queue makes writers wait rather than grow memory.
pub const MAX_PENDING_SYNCS: usize = 65_536;

/// What to do once a write is durable.
pub(crate) enum Completion {
    /// An append's callback.
    Append(IOFlushed<TypeConfig>),
    /// A caller waiting for the result.
    Wait(oneshot::Sender<Result<(), String>>),
}

impl Completion {
    fn complete(self, result: Result<(), &str>) {
        match self {
            Completion::Append(callback) => {
                callback.io_completed(result.map_err(|e| std::io::Error::other(e.to_owned())))
            }
            Completion::Wait(tx) => {
                // The waiter may have gone (its task was cancelled); the
                // write is durable or failed all the same.
                let _ = tx.send(result.map_err(str::to_owned));
            }
        }
    }
}

/// The handle writers submit to; the thread ends when every handle is
/// dropped. Cloning is cheap.
#[derive(Clone)]
pub(crate) struct Syncer {
    tx: mpsc::SyncSender<Completion>,
}

impl Syncer {
    /// Starts the sync thread for the log in `dir`; `sync` makes
    /// everything written so far durable, or says what failed.
    pub(crate) fn start<F>(dir: &Path, sync: F) -> Result<Syncer, StoreError>
    where
        F: FnMut() -> Result<(), String> + Send + 'static,
    {
        let (tx, rx) = mpsc::sync_channel(MAX_PENDING_SYNCS);
        let path = dir.to_owned();
        std::thread::Builder::new()
            .name("tern-log-sync".into())
            .spawn(move || run(sync, &path, &rx))
            .map_err(StoreError::io("start the sync thread", dir))?;
        Ok(Syncer { tx })
    }

    /// Queues `completion` to run once everything written so far is
    /// durable. Blocks only when [`MAX_PENDING_SYNCS`] are queued.
    pub(crate) fn submit(&self, completion: Completion) -> Result<(), Completion> {
        self.tx.send(completion).map_err(|e| e.0)
    }

    /// Waits until everything written so far is durable.
    pub(crate) async fn sync(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        if self.submit(Completion::Wait(tx)).is_err() {
            return Err(StoreError::Sync("the sync thread has stopped".into()));
        }
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Sync(e)),
            Err(_) => Err(StoreError::Sync("the sync thread has stopped".into())),
        }
    }
}

/// The sync thread: one sync per group of queued completions, in order.
fn run<F>(mut sync: F, dir: &Path, rx: &mpsc::Receiver<Completion>)
where
    F: FnMut() -> Result<(), String>,
{
    let mut failed: Option<String> = None;
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        group.extend(rx.try_iter());
        if failed.is_none() {
            let started = Instant::now();
            tracing::trace!(target: "tern_commit_path", writes = group.len(), "sync started");
            let result = sync();
            metrics::histogram!(tern_protocol::metric_names::STORE_SYNC_SECONDS)
                .record(started.elapsed().as_secs_f64());
            match result {
                Ok(()) => tracing::trace!(
                    target: "tern_commit_path",
                    writes = group.len(),
                    micros = started.elapsed().as_micros(),
                    "log synced"
                ),
                Err(e) => {
                    // Said as every log write failure is: what failed, where,
                    // and what to check.
                    let e = StoreError::LogWrite {
                        op: "sync",
                        dir: dir.to_owned(),
                        source: Box::new(StoreError::Sync(e)),
                    }
                    .to_string();
                    tracing::error!(error = %e, "Raft storage failure: this node stops; every later write fails too");
                    failed = Some(e);
                }
            }
        }
        let result = failed.as_deref().map_or(Ok(()), Err);
        for completion in group {
            completion.complete(result);
        }
    }
}
