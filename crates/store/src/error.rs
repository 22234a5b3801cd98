//! The store's typed errors.
//!
//! openraft's storage traits speak [`std::io::Error`]; every error this
//! crate returns through them wraps a [`StoreError`] (reachable with
//! [`std::io::Error::get_ref`] and `downcast_ref`), so the cause survives up
//! to openraft's `StorageError` and the logs. Data read from disk that does
//! not decode is [`StoreError::Corrupt`], naming the tree and key or the
//! file; it is never a panic.

use std::io;
use std::path::PathBuf;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed.
    #[error("sled {op} failed: {source}")]
    Sled {
        /// What was being done.
        op: &'static str,
        /// sled's error.
        #[source]
        source: sled::Error,
    },
    /// A file operation failed.
    #[error("{op} {path:?}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// A record in sled does not decode, or decodes to something that
    /// contradicts its key.
    #[error("corrupt record in tree {tree:?} at key {key}: {reason}")]
    Corrupt {
        /// The sled tree.
        tree: &'static str,
        /// The key, readable (a log index, or the key's text).
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A Raft log segment holds something that does not read back.
    #[error(
        "corrupt Raft log segment {path:?} at byte {offset}: {reason}; this node's log \
         cannot be trusted: move its data directory aside and join the node to the \
         cluster again (operations.md, Membership) so it is sent a snapshot"
    )]
    CorruptLog {
        /// The segment file.
        path: PathBuf,
        /// Where the record that does not read starts.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A snapshot file is malformed or fails its checksum.
    #[error("corrupt snapshot {path:?}: {reason}")]
    CorruptSnapshot {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A snapshot being received grew past the size limit.
    #[error("snapshot of {len} bytes exceeds the limit of {max} bytes")]
    SnapshotTooLarge {
        /// Bytes it would have.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The data directory was written by another on-disk format version.
    #[error("store format version {found} is not supported (this build reads version {expected})")]
    Format {
        /// Version found on disk.
        found: u32,
        /// Version this build writes.
        expected: u32,
    },
    /// A value could not be encoded (a bug, or a value past a size limit).
    #[error("encoding {what} failed: {source}")]
    Encode {
        /// What was being encoded.
        what: &'static str,
        /// postcard's error.
        #[source]
        source: postcard::Error,
    },
    /// A lock was poisoned by a panic in another thread; the in-memory state
    /// may be half-updated and is not used again.
    #[error("state machine lock poisoned by an earlier panic")]
    Poisoned,
    /// Writing or syncing the Raft log failed. openraft stops Raft on any
    /// storage error, and the node exits: an unsynced log could
    /// acknowledge what it would lose.
    #[error(
        "Raft log {op} in {dir:?} failed: {source}; check the disk holding it \
         (free space, permissions, I/O errors in the kernel log), then restart the node"
    )]
    LogWrite {
        /// What was being done: `append`, `save vote`, `truncate`, `purge`.
        op: &'static str,
        /// The log directory.
        dir: PathBuf,
        /// What failed.
        #[source]
        source: Box<StoreError>,
    },
    /// Making the log durable (sled's flush, then `fdatasync`) failed, now
    /// or at an earlier sync (after which nothing is acknowledged again).
    #[error("sync failed: {0}")]
    Sync(String),
    /// A blocking task was cancelled or panicked.
    #[error("storage task failed: {0}")]
    Task(String),
}

impl StoreError {
    pub(crate) fn sled(op: &'static str) -> impl FnOnce(sled::Error) -> StoreError {
        move |source| StoreError::Sled { op, source }
    }

    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(io::Error) -> StoreError {
        let path = path.into();
        move |source| StoreError::Io { op, path, source }
    }

    pub(crate) fn encode(what: &'static str) -> impl FnOnce(postcard::Error) -> StoreError {
        move |source| StoreError::Encode { what, source }
    }
}

impl From<StoreError> for io::Error {
    fn from(e: StoreError) -> io::Error {
        let kind = match &e {
            StoreError::Corrupt { .. }
            | StoreError::CorruptLog { .. }
            | StoreError::CorruptSnapshot { .. } => io::ErrorKind::InvalidData,
            StoreError::Io { source, .. } => source.kind(),
            StoreError::SnapshotTooLarge { .. } => io::ErrorKind::FileTooLarge,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}
