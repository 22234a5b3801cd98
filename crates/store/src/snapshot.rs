//! Snapshot files: the state machine written to disk.
//!
//! A snapshot is one file in the snapshot directory:
//!
//! ```text
//!  0        8          12          16              16+m
//!  +--------+----------+-----------+---------------+------------------+-------+
//!  | magic  | version  | meta len m| meta (postcard)| state (postcard) | crc32 |
//!  +--------+----------+-----------+---------------+------------------+-------+
//! ```
//!
//! integers little-endian; the trailing CRC-32 covers every byte before it.
//! The current snapshot is `current.snap`. A new one (built here or received
//! from the leader) is written to a `*.tmp` file in the same directory,
//! `fsync`ed, then renamed over `current.snap` and the directory `fsync`ed,
//! so a crash leaves either the old snapshot or the new one, never a mix.
//!
//! Memory: the state is encoded straight from the live state into a
//! buffered file writer, and decoded straight from a buffered reader, so
//! neither direction builds a second in-memory copy of the state. The
//! checksum is verified in a streaming pass before decoding.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::StoreError;
use crate::types::SnapshotMeta;
use tern_state::ClusterState;

/// First bytes of every snapshot file.
const MAGIC: &[u8; 8] = b"TERNSNAP";
/// Snapshot format version; a file of another version is refused.
/// Version 2: the cluster state gained the metadata register.
/// Version 3: the cluster state gained the access table and its log.
/// Version 4: the access log became the audit log (access, join-token and
/// membership changes), and the state gained the join tokens.
/// Version 5: the state gained the history of VM changes and the current
/// revision (`tern_state::events`).
/// Version 6: the state gained the guest network's pool and leases
/// (`tern_state::network`) and the VMs' user data.
/// Version 7: the state gained node labels and the desired transport
/// policies (`tern_state::policy`).
/// Version 8: the state gained the transport rollout
/// (`tern_state::rollout`).
/// Version 9: the state gained the agents (`tern_state::agent`).
pub const SNAPSHOT_FORMAT_VERSION: u32 = 9;
/// The oldest format still read: version 2's state is version 3's without
/// its trailing access fields ([`tern_state::state::ClusterStateV2`]),
/// version 3's has the access log in its own layout and no tokens
/// ([`tern_state::state::ClusterStateV3`]), version 4's has no history of
/// VM changes ([`tern_state::state::ClusterStateV4`]), version 5's no guest
/// network ([`tern_state::state::ClusterStateV5`]), version 6's no labels
/// and desired policies ([`tern_state::state::ClusterStateV6`]), version
/// 7's no rollout ([`tern_state::state::ClusterStateV7`]), version 8's no
/// agents ([`tern_state::state::ClusterStateV8`]); so a node upgraded
/// in place keeps its data. A state of an older format gets an empty
/// history, whole after the snapshot's last index.
pub const OLDEST_READABLE_FORMAT: u32 = 2;
/// Bytes before the metadata.
const PREFIX_LEN: u64 = 16;
/// Bytes of the trailing checksum.
const TRAILER_LEN: u64 = 4;

/// Largest encoded snapshot metadata. Metadata is a log id and a membership
/// of a few dozen nodes; anything larger is corruption.
pub const MAX_META_LEN: u32 = 1024 * 1024;

/// Largest snapshot file accepted from a leader: 1 GiB. The cluster state
/// (members and VM records) is far smaller; the limit stops a confused or
/// hostile sender from filling the disk.
pub const MAX_SNAPSHOT_BYTES: u64 = 1024 * 1024 * 1024;

/// Largest single string or byte field the decoder reads; its scratch
/// buffer is this big (postcard reads every owned string through it), so a
/// longer field makes the snapshot undecodable and the node unable to
/// start. It is the whole write limit: no field of an accepted write can
/// be longer than the write, whatever the per-field limits become.
pub const MAX_FIELD_LEN: usize = tern_state::limits::MAX_REQUEST_BYTES;

// Every string a command may carry fits the scratch buffer.
const _: () = assert!(tern_state::limits::MAX_STRING_FIELD_LEN <= MAX_FIELD_LEN);
const _: () = assert!(tern_state::limits::MAX_REQUEST_BYTES <= MAX_FIELD_LEN);

/// I/O buffer size for writing and reading snapshot files.
const IO_BUFFER: usize = 64 * 1024;

const _: () = assert!((MAX_META_LEN as u64) < MAX_SNAPSHOT_BYTES);

/// File name of the current snapshot within the snapshot directory.
pub(crate) const CURRENT: &str = "current.snap";
/// Suffix of files still being written.
const TMP_SUFFIX: &str = ".tmp";

/// Distinguishes temporary files made by one process.
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Where a [`SnapshotFile`] came from, which decides how it is installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// A store's current snapshot, opened for reading.
    Current,
    /// A temporary file being received, to be renamed into place.
    Incoming,
}

/// A snapshot's bytes on disk: openraft's `SnapshotData` for this store.
///
/// The sender reads it in chunks ([`SnapshotFile::read_at`]); the receiver
/// gets an empty one from
/// [`StateMachineStore::begin_receiving_snapshot`](crate::StateMachineStore::begin_receiving_snapshot),
/// writes the chunks into it ([`SnapshotFile::write_at`]) and hands it to
/// openraft, which installs it. The open file handle is the snapshot: it
/// stays readable even after a newer snapshot replaces the file name.
#[derive(Debug)]
pub struct SnapshotFile {
    path: PathBuf,
    file: File,
    origin: Origin,
}

impl SnapshotFile {
    /// The file's path when it was opened or created.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's current length in bytes.
    pub fn len(&self) -> Result<u64, StoreError> {
        Ok(self
            .file
            .metadata()
            .map_err(StoreError::io("stat", &self.path))?
            .len())
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.len()? == 0)
    }

    /// Reads up to `buf.len()` bytes at `offset`; returns how many were
    /// read, 0 at the end. Blocking file I/O: call it from a blocking
    /// context for large chunks.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize, StoreError> {
        self.file
            .read_at(buf, offset)
            .map_err(StoreError::io("read snapshot", &self.path))
    }

    /// Writes a received chunk at `offset`. Refuses chunks that would take
    /// the file past [`MAX_SNAPSHOT_BYTES`]. Blocking file I/O.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), StoreError> {
        let end = offset.saturating_add(data.len() as u64);
        if end > MAX_SNAPSHOT_BYTES {
            return Err(StoreError::SnapshotTooLarge {
                len: end,
                max: MAX_SNAPSHOT_BYTES,
            });
        }
        self.file
            .write_all_at(data, offset)
            .map_err(StoreError::io("write snapshot", &self.path))
    }

    /// Reads the metadata from the file's header.
    pub fn meta(&self) -> Result<SnapshotMeta, StoreError> {
        let mut reader = BufReader::new(PositionedReader::new(&self.file, 0));
        read_header(&mut reader, &self.path).map(|(meta, _)| meta)
    }

    pub(crate) fn is_incoming_in(&self, dir: &Path) -> bool {
        self.origin == Origin::Incoming && self.path.parent() == Some(dir)
    }
}

/// Reads a file from an offset without moving a shared cursor.
struct PositionedReader<'a> {
    file: &'a File,
    offset: u64,
}

impl<'a> PositionedReader<'a> {
    fn new(file: &'a File, offset: u64) -> Self {
        PositionedReader { file, offset }
    }
}

impl Read for PositionedReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.offset)?;
        self.offset += n as u64;
        Ok(n)
    }
}

/// A writer that keeps a running CRC-32 of what passes through it.
struct CrcWriter<W> {
    inner: W,
    crc: crc32fast::Hasher,
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn corrupt(path: &Path, reason: impl ToString) -> StoreError {
    StoreError::CorruptSnapshot {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// Reads and checks the prefix and metadata; leaves `reader` at the state.
/// Returns the metadata and the file's format version.
fn read_header<R: Read>(reader: &mut R, path: &Path) -> Result<(SnapshotMeta, u32), StoreError> {
    let mut prefix = [0u8; PREFIX_LEN as usize];
    reader
        .read_exact(&mut prefix)
        .map_err(|e| corrupt(path, format!("reading header: {e}")))?;
    if &prefix[..8] != MAGIC {
        return Err(corrupt(path, "not a snapshot file (bad magic)"));
    }
    let version = u32::from_le_bytes([prefix[8], prefix[9], prefix[10], prefix[11]]);
    if !(OLDEST_READABLE_FORMAT..=SNAPSHOT_FORMAT_VERSION).contains(&version) {
        return Err(corrupt(
            path,
            format!(
                "format version {version}, this build reads {OLDEST_READABLE_FORMAT} to {SNAPSHOT_FORMAT_VERSION}"
            ),
        ));
    }
    let meta_len = u32::from_le_bytes([prefix[12], prefix[13], prefix[14], prefix[15]]);
    if meta_len > MAX_META_LEN {
        return Err(corrupt(
            path,
            format!("metadata of {meta_len} bytes exceeds {MAX_META_LEN}"),
        ));
    }
    let mut meta = vec![0u8; meta_len as usize];
    reader
        .read_exact(&mut meta)
        .map_err(|e| corrupt(path, format!("reading metadata: {e}")))?;
    postcard::from_bytes(&meta)
        .map(|meta| (meta, version))
        .map_err(|e| corrupt(path, format!("metadata: {e}")))
}

/// Checks the trailing CRC-32 in one streaming pass.
fn verify(file: &File, path: &Path) -> Result<(), StoreError> {
    let len = file.metadata().map_err(StoreError::io("stat", path))?.len();
    if len < PREFIX_LEN + TRAILER_LEN {
        return Err(corrupt(path, format!("only {len} bytes")));
    }
    let body = len - TRAILER_LEN;
    let mut reader = BufReader::with_capacity(IO_BUFFER, PositionedReader::new(file, 0)).take(body);
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; IO_BUFFER];
    loop {
        let n = reader
            .read(&mut buf)
            .map_err(StoreError::io("read snapshot", path))?;
        if n == 0 {
            break;
        }
        crc.update(&buf[..n]);
    }
    let mut trailer = [0u8; TRAILER_LEN as usize];
    file.read_exact_at(&mut trailer, body)
        .map_err(StoreError::io("read snapshot", path))?;
    let (want, got) = (u32::from_le_bytes(trailer), crc.finalize());
    if want != got {
        return Err(corrupt(
            path,
            format!("checksum mismatch: file says {want:#010x}, content is {got:#010x}"),
        ));
    }
    Ok(())
}

/// Syncs a directory so that a rename in it is durable.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StoreError::io("sync directory", dir))
}

/// The directory holding one store's snapshots.
#[derive(Debug, Clone)]
pub(crate) struct SnapshotDir {
    dir: PathBuf,
}

impl SnapshotDir {
    /// Opens the directory, creating it, and removes temporary files left
    /// by a crash.
    pub(crate) fn open(dir: &Path) -> Result<SnapshotDir, StoreError> {
        std::fs::create_dir_all(dir).map_err(StoreError::io("create directory", dir))?;
        let entries = std::fs::read_dir(dir).map_err(StoreError::io("list directory", dir))?;
        for entry in entries {
            let entry = entry.map_err(StoreError::io("list directory", dir))?;
            let name = entry.file_name();
            if name.to_string_lossy().ends_with(TMP_SUFFIX) {
                tracing::info!(file = ?entry.path(), "removing unfinished snapshot file");
                std::fs::remove_file(entry.path())
                    .map_err(StoreError::io("remove", entry.path()))?;
            }
        }
        Ok(SnapshotDir {
            dir: dir.to_owned(),
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.dir
    }

    fn current_path(&self) -> PathBuf {
        self.dir.join(CURRENT)
    }

    fn tmp_path(&self, what: &str) -> PathBuf {
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        self.dir
            .join(format!("{what}-{}-{n}{TMP_SUFFIX}", std::process::id()))
    }

    /// A new empty file to receive a snapshot into.
    pub(crate) fn create_incoming(&self) -> Result<SnapshotFile, StoreError> {
        let path = self.tmp_path("incoming");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(StoreError::io("create", &path))?;
        Ok(SnapshotFile {
            path,
            file,
            origin: Origin::Incoming,
        })
    }

    /// The current snapshot, if there is one.
    pub(crate) fn open_current(&self) -> Result<Option<SnapshotFile>, StoreError> {
        let path = self.current_path();
        match File::open(&path) {
            Ok(file) => Ok(Some(SnapshotFile {
                path,
                file,
                origin: Origin::Current,
            })),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::io("open", path)(e)),
        }
    }

    /// Writes `state` with `meta` as the new current snapshot, atomically.
    /// Returns the new snapshot, open for reading.
    pub(crate) fn write_current(
        &self,
        meta: &SnapshotMeta,
        state: &ClusterState,
    ) -> Result<SnapshotFile, StoreError> {
        let tmp = self.tmp_path("building");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(StoreError::io("create", &tmp))?;
        let result =
            write_snapshot(&file, &tmp, meta, state).and_then(|()| self.replace_current(&tmp));
        if let Err(e) = result {
            // Best effort: the file is removed at the next open otherwise.
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(SnapshotFile {
            path: self.current_path(),
            file,
            origin: Origin::Current,
        })
    }

    /// Makes a fully written and synced file the current snapshot.
    fn replace_current(&self, from: &Path) -> Result<(), StoreError> {
        let to = self.current_path();
        std::fs::rename(from, &to).map_err(StoreError::io("rename", from))?;
        sync_dir(&self.dir)
    }

    /// Makes `snapshot` the current snapshot: renames it into place if it
    /// is a file received into this directory, copies it otherwise. Leaves
    /// the current snapshot alone if `snapshot` already is it. Checks the
    /// checksum first.
    pub(crate) fn install(&self, snapshot: &SnapshotFile) -> Result<(), StoreError> {
        verify(&snapshot.file, &snapshot.path)?;
        if snapshot.origin == Origin::Current && snapshot.path == self.current_path() {
            return Ok(());
        }
        if snapshot.is_incoming_in(&self.dir) {
            snapshot
                .file
                .sync_all()
                .map_err(StoreError::io("sync", &snapshot.path))?;
            return self.replace_current(&snapshot.path);
        }
        let tmp = self.tmp_path("copy");
        let result = (|| {
            let mut out = File::create(&tmp).map_err(StoreError::io("create", &tmp))?;
            let mut reader =
                BufReader::with_capacity(IO_BUFFER, PositionedReader::new(&snapshot.file, 0));
            io::copy(&mut reader, &mut out).map_err(StoreError::io("copy snapshot", &tmp))?;
            out.sync_all().map_err(StoreError::io("sync", &tmp))?;
            self.replace_current(&tmp)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

/// Encodes a snapshot into `file` and syncs it.
fn write_snapshot(
    file: &File,
    path: &Path,
    meta: &SnapshotMeta,
    state: &ClusterState,
) -> Result<(), StoreError> {
    let meta_bytes = postcard::to_stdvec(meta).map_err(StoreError::encode("snapshot meta"))?;
    let meta_len = u32::try_from(meta_bytes.len())
        .ok()
        .filter(|n| *n <= MAX_META_LEN)
        .ok_or_else(|| corrupt(path, "metadata too large to write"))?;
    let mut out = CrcWriter {
        inner: BufWriter::with_capacity(IO_BUFFER, file),
        crc: crc32fast::Hasher::new(),
    };
    let io_err = StoreError::io("write snapshot", path);
    let header = (|| {
        out.write_all(MAGIC)?;
        out.write_all(&SNAPSHOT_FORMAT_VERSION.to_le_bytes())?;
        out.write_all(&meta_len.to_le_bytes())?;
        out.write_all(&meta_bytes)
    })();
    header.map_err(io_err)?;
    let out = postcard::to_io(state, out).map_err(StoreError::encode("cluster state"))?;
    let CrcWriter { mut inner, crc } = out;
    let crc = crc.finalize();
    let done = (|| {
        inner.write_all(&crc.to_le_bytes())?;
        inner.flush()?;
        inner.get_ref().sync_all()
    })();
    done.map_err(StoreError::io("write snapshot", path))?;
    Ok(())
}

/// Whether [`read_snapshot`] checks the checksum first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verify {
    /// Check it: the file has not been verified yet.
    Checksum,
    /// The caller has just verified it.
    Skip,
}

/// Decodes a snapshot file, checking its checksum first unless the caller
/// just did. The state is decoded straight from the file.
pub(crate) fn read_snapshot(
    snapshot: &SnapshotFile,
    check: Verify,
) -> Result<(SnapshotMeta, ClusterState), StoreError> {
    let path = &snapshot.path;
    if check == Verify::Checksum {
        verify(&snapshot.file, path)?;
    }
    let len = snapshot.len()?;
    let body = PositionedReader::new(&snapshot.file, 0).take(len.saturating_sub(TRAILER_LEN));
    let mut reader = BufReader::with_capacity(IO_BUFFER, body);
    let (meta, version) = read_header(&mut reader, path)?;
    let mut scratch = vec![0u8; MAX_FIELD_LEN];
    let mut state = if version == SNAPSHOT_FORMAT_VERSION {
        postcard::from_io::<ClusterState, _>((reader, &mut scratch))
            .map_err(|e| corrupt(path, format!("state: {e}")))?
            .0
    } else if version == 8 {
        let (old, _) =
            postcard::from_io::<tern_state::state::ClusterStateV8, _>((reader, &mut scratch))
                .map_err(|e| corrupt(path, format!("state (format {version}): {e}")))?;
        tracing::info!(path = %path.display(), version, "read a snapshot of an older format; it has no agents until they register");
        ClusterState::from(old)
    } else if version == 7 {
        let (old, _) =
            postcard::from_io::<tern_state::state::ClusterStateV7, _>((reader, &mut scratch))
                .map_err(|e| corrupt(path, format!("state (format {version}): {e}")))?;
        tracing::info!(path = %path.display(), version, "read a snapshot of an older format; it has no rollout until one is started");
        ClusterState::from(old)
    } else if version == 6 {
        let (old, _) =
            postcard::from_io::<tern_state::state::ClusterStateV6, _>((reader, &mut scratch))
                .map_err(|e| corrupt(path, format!("state (format {version}): {e}")))?;
        tracing::info!(path = %path.display(), version, "read a snapshot of an older format; it has no node labels or desired transport policies until they are set");
        ClusterState::from(old)
    } else if version == 5 {
        let (old, _) =
            postcard::from_io::<tern_state::state::ClusterStateV5, _>((reader, &mut scratch))
                .map_err(|e| corrupt(path, format!("state (format {version}): {e}")))?;
        tracing::info!(path = %path.display(), version, "read a snapshot of an older format; it has no guest network pool until one is set");
        ClusterState::from(old)
    } else if version == 4 {
        let (old, _) =
            postcard::from_io::<tern_state::state::ClusterStateV4, _>((reader, &mut scratch))
                .map_err(|e| corrupt(path, format!("state (format {version}): {e}")))?;
        tracing::info!(path = %path.display(), version, "read a snapshot of an older format; its history of VM changes starts empty");
        ClusterState::from(old)
    } else if version == 3 {
        let (old, _) =
            postcard::from_io::<tern_state::state::ClusterStateV3, _>((reader, &mut scratch))
                .map_err(|e| corrupt(path, format!("state (format {version}): {e}")))?;
        tracing::info!(path = %path.display(), version, "read a snapshot of an older format; it has no join tokens");
        ClusterState::from(old)
    } else {
        let (old, _) =
            postcard::from_io::<tern_state::state::ClusterStateV2, _>((reader, &mut scratch))
                .map_err(|e| corrupt(path, format!("state (format {version}): {e}")))?;
        tracing::info!(path = %path.display(), version, "read a snapshot of an older format; its access table starts empty");
        ClusterState::from(old)
    };
    if version < 5 {
        state.start_vm_history_at(meta.last_log_id.map_or(0, |id| id.index));
    }
    Ok((meta, state))
}

#[cfg(test)]
mod format_tests {
    #![allow(clippy::unwrap_used)] // reason: test code; a failed unwrap is a failed test.

    use super::*;
    use tern_state::Command;

    /// The body of a format 9 file of a state with no agents, without
    /// them (an empty map: one byte in postcard): the body format 8 wrote.
    fn without_agents(bytes: &[u8]) -> &[u8] {
        let body = &bytes[..bytes.len() - TRAILER_LEN as usize];
        assert_eq!(&body[body.len() - 1..], &[0], "no agents");
        &body[..body.len() - 1]
    }

    /// The body of a format 9 file of a state with no agents and no
    /// rollout, without them (`None`: one byte in postcard): the body
    /// format 7 wrote.
    fn without_rollout(bytes: &[u8]) -> &[u8] {
        let body = without_agents(bytes);
        assert_eq!(&body[body.len() - 1..], &[0], "no rollout");
        &body[..body.len() - 1]
    }

    /// The body of a format 9 file of a state with no rollout, no labels
    /// and no desired policy, without them (no labels; no node, no group
    /// policies, none for all: one byte each in postcard): the body format
    /// 6 wrote.
    fn without_policies(bytes: &[u8]) -> &[u8] {
        let body = without_rollout(bytes);
        assert_eq!(
            &body[body.len() - 4..],
            &[0, 0, 0, 0],
            "no labels or policies"
        );
        &body[..body.len() - 4]
    }

    /// The body of a format 9 file of a state with no pool set, no user
    /// data, no labels and no policies, without the trailing network and
    /// user data as well (no pool, no leases, cursor 0, no user data: one
    /// byte each in postcard): the body format 5 wrote.
    fn without_network(bytes: &[u8]) -> &[u8] {
        let body = without_policies(bytes);
        assert_eq!(&body[body.len() - 4..], &[0, 0, 0, 0], "no network");
        &body[..body.len() - 4]
    }

    /// The body of a format 6 file of a state whose only command was
    /// applied at index 1 and changed no VM, without the trailing network
    /// and history (no events, whole after 0, revision 1: one byte each in
    /// postcard).
    fn without_history(bytes: &[u8]) -> &[u8] {
        let body = without_network(bytes);
        assert_eq!(&body[body.len() - 3..], &[0, 0, 1], "an empty history");
        &body[..body.len() - 3]
    }

    /// A snapshot written by format 5 (no guest network) opens with its
    /// state, history included, intact and no pool: as a log of that
    /// version applies.
    #[test]
    fn a_format_5_snapshot_is_read_without_a_pool() {
        let dir = tempfile::tempdir().unwrap();
        let snaps = SnapshotDir::open(dir.path()).unwrap();
        let mut state = ClusterState::default();
        state.apply_at(
            1,
            Command::PutMeta {
                request_id: "r1".into(),
                key: "zone".into(),
                value: "d".into(),
            },
        );
        let file = snaps
            .write_current(&SnapshotMeta::default(), &state)
            .unwrap();
        let bytes = std::fs::read(file.path()).unwrap();
        let old = rewrite_as(without_network(&bytes), 5);
        let path = file.path().to_owned();
        drop(file);
        std::fs::write(&path, &old).unwrap();
        let file = snaps.open_current().unwrap().unwrap();
        let (_, read) = read_snapshot(&file, Verify::Checksum).unwrap();
        assert_eq!(read, state, "the state comes back whole");
        assert!(read.network().pool().is_none());
    }

    /// A snapshot written by format 8 (no agents) opens with its state,
    /// rollout included, intact and no agents.
    #[test]
    fn a_format_8_snapshot_is_read_without_agents() {
        let dir = tempfile::tempdir().unwrap();
        let snaps = SnapshotDir::open(dir.path()).unwrap();
        let mut state = ClusterState::default();
        state.apply_at(
            1,
            Command::SetTransportPolicy {
                request_id: "r1".into(),
                target: tern_state::PolicyTarget::All,
                policy: Some(tern_protocol::policy::TransportConfig::default()),
            },
        );
        let file = snaps
            .write_current(&SnapshotMeta::default(), &state)
            .unwrap();
        let bytes = std::fs::read(file.path()).unwrap();
        let old = rewrite_as(without_agents(&bytes), 8);
        let path = file.path().to_owned();
        drop(file);
        std::fs::write(&path, &old).unwrap();
        let file = snaps.open_current().unwrap().unwrap();
        let (_, read) = read_snapshot(&file, Verify::Checksum).unwrap();
        assert_eq!(read, state, "the state comes back whole");
        assert!(read.agents().is_empty());
    }

    /// A snapshot written by format 7 (no rollout) opens with its state,
    /// labels and desired policies intact and no rollout.
    #[test]
    fn a_format_7_snapshot_is_read_without_a_rollout() {
        let dir = tempfile::tempdir().unwrap();
        let snaps = SnapshotDir::open(dir.path()).unwrap();
        let mut state = ClusterState::default();
        state.apply_at(
            1,
            Command::SetTransportPolicy {
                request_id: "r1".into(),
                target: tern_state::PolicyTarget::All,
                policy: Some(tern_protocol::policy::TransportConfig::default()),
            },
        );
        let file = snaps
            .write_current(&SnapshotMeta::default(), &state)
            .unwrap();
        let bytes = std::fs::read(file.path()).unwrap();
        let old = rewrite_as(without_rollout(&bytes), 7);
        let path = file.path().to_owned();
        drop(file);
        std::fs::write(&path, &old).unwrap();
        let file = snaps.open_current().unwrap().unwrap();
        let (_, read) = read_snapshot(&file, Verify::Checksum).unwrap();
        assert_eq!(read, state, "the state comes back whole");
        assert!(read.desired_policies().all.is_some());
        assert!(read.rollout().is_none());
    }

    /// A snapshot written by format 6 (no labels, no desired policies)
    /// opens with its state intact and none of either.
    #[test]
    fn a_format_6_snapshot_is_read_without_labels_or_policies() {
        let dir = tempfile::tempdir().unwrap();
        let snaps = SnapshotDir::open(dir.path()).unwrap();
        let mut state = ClusterState::default();
        state.apply_at(
            1,
            Command::PutMeta {
                request_id: "r1".into(),
                key: "zone".into(),
                value: "e".into(),
            },
        );
        let file = snaps
            .write_current(&SnapshotMeta::default(), &state)
            .unwrap();
        let bytes = std::fs::read(file.path()).unwrap();
        let old = rewrite_as(without_policies(&bytes), 6);
        let path = file.path().to_owned();
        drop(file);
        std::fs::write(&path, &old).unwrap();
        let file = snaps.open_current().unwrap().unwrap();
        let (_, read) = read_snapshot(&file, Verify::Checksum).unwrap();
        assert_eq!(read, state, "the state comes back whole");
        assert!(read.node_labels().is_empty());
        assert_eq!(read.desired_policy(1), None);
    }

    fn rewrite_as(body: &[u8], version: u32) -> Vec<u8> {
        let mut old = body.to_vec();
        old[8..12].copy_from_slice(&version.to_le_bytes());
        let crc = crc32fast::hash(&old);
        old.extend_from_slice(&crc.to_le_bytes());
        old
    }

    /// A snapshot written by format 4 (no history of VM changes) opens with
    /// its state intact and an empty history that is whole after the
    /// snapshot's last index: a watch from before it is told to re-list.
    #[test]
    fn a_format_4_snapshot_is_read_with_a_history_starting_at_its_index() {
        let dir = tempfile::tempdir().unwrap();
        let snaps = SnapshotDir::open(dir.path()).unwrap();
        let mut state = ClusterState::default();
        state.apply_at(
            1,
            Command::PutMeta {
                request_id: "r1".into(),
                key: "zone".into(),
                value: "c".into(),
            },
        );
        let meta = SnapshotMeta {
            last_log_id: Some(openraft::testing::log_id::<crate::types::TypeConfig>(
                2, 1, 7,
            )),
            ..SnapshotMeta::default()
        };
        let file = snaps.write_current(&meta, &state).unwrap();
        let bytes = std::fs::read(file.path()).unwrap();
        let old = rewrite_as(without_history(&bytes), 4);
        let path = file.path().to_owned();
        drop(file);
        std::fs::write(&path, &old).unwrap();
        let file = snaps.open_current().unwrap().unwrap();
        let (read_meta, read) = read_snapshot(&file, Verify::Checksum).unwrap();
        assert_eq!(read_meta, meta);
        assert_eq!(read.vm_history().revision(), 7);
        assert_eq!(read.vm_history().complete_after(), 7);
        state.start_vm_history_at(7);
        assert_eq!(read, state, "the state comes back whole");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Whatever VM, label and policy changes a state went through, its
        /// format 8 snapshot brings back the same state, history,
        /// revision, leases, labels, desired policies and rollout
        /// included.
        #[test]
        fn a_state_with_history_round_trips_through_a_snapshot(
            ops in proptest::collection::vec((0u8..8, 0u8..6, 0usize..300), 0..80)
        ) {
            let dir = tempfile::tempdir().unwrap();
            let snaps = SnapshotDir::open(dir.path()).unwrap();
            let mut state = ClusterState::default();
            let members: Vec<(u64, tern_state::Member)> = (1u8..=3)
                .map(|i| (u64::from(i), tern_state::Member::new(
                    tern_protocol::PeerAddr::new(tern_protocol::PeerId::from_bytes([i; 32])),
                    tern_state::Capacity::default(),
                )))
                .collect();
            state.apply_membership(members.iter().map(|(id, m)| (id, m)));
            for (i, (op, n, pad)) in ops.into_iter().enumerate() {
                let index = i as u64 + 1;
                let vm_id = format!("vm-{n}");
                let cmd = match op {
                    0 | 1 => Command::PutVm {
                        request_id: format!("p{index}"),
                        vm: Box::new(tern_state::VmRecord {
                            id: vm_id.clone(),
                            // Never zero-sized: the derived index keeps no
                            // entry for a node whose reservations sum to 0.
                            spec: tern_state::VmSpec { name: vm_id, vcpus: 1, memory_mib: 64, ..Default::default() },
                            reason: "r".repeat(pad),
                            ..Default::default()
                        }),
                    },
                    2 => Command::DeleteVm { request_id: format!("d{index}"), vm_id },
                    // Setting the pool leases the VMs there at that point.
                    3 => Command::SetNetworkPool {
                        request_id: format!("n{index}"),
                        pool: "10.7.0.0/24".parse().unwrap(),
                    },
                    5 => Command::SetNodeLabels {
                        request_id: format!("l{index}"),
                        node_id: u64::from(n % 4),
                        labels: [("zone".to_owned(), format!("z{}", pad % 3))].into(),
                    },
                    6 | 7 => Command::SetTransportPolicy {
                        request_id: format!("t{index}"),
                        target: match n % 3 {
                            0 => tern_state::PolicyTarget::Node(u64::from(n)),
                            1 => tern_state::PolicyTarget::Group(
                                tern_state::Selector::parse(&format!("zone=z{}", pad % 3)).unwrap(),
                            ),
                            _ => tern_state::PolicyTarget::All,
                        },
                        policy: (op == 6).then(|| tern_protocol::policy::TransportConfig {
                            mode: tern_protocol::policy::Mode::Dual,
                            ..Default::default()
                        }),
                    },
                    4 => Command::Rollout {
                        request_id: format!("o{index}"),
                        op: match n % 3 {
                            0 => tern_state::RolloutOp::Start {
                                plan: tern_state::Plan {
                                    name: "p".into(),
                                    gates: tern_state::Gates::default(),
                                    stages: vec![tern_state::Stage {
                                        name: "s".into(),
                                        percent: Some(50),
                                        nodes: vec![],
                                        soak_secs: pad as u64,
                                        policy: tern_protocol::policy::TransportConfig::default(),
                                    }; 2],
                                },
                            },
                            1 => tern_state::RolloutOp::Advance {
                                expected_seq: None,
                                checks: vec![],
                                figures: Some(tern_state::GateFigures::default()),
                            },
                            _ => tern_state::RolloutOp::Abort,
                        },
                        last: vec![1],
                        at_unix_ms: index * 1000,
                    },
                    _ => Command::PutMeta {
                        request_id: format!("m{index}"),
                        key: "k".into(),
                        value: "v".repeat(pad),
                    },
                };
                state.apply_at(index, cmd);
            }
            let file = snaps.write_current(&SnapshotMeta::default(), &state).unwrap();
            let (_, read) = read_snapshot(&file, Verify::Checksum).unwrap();
            proptest::prop_assert_eq!(read, state);
        }

        /// Arbitrary bytes after a valid header, with a valid checksum, of
        /// any readable format, decode to a typed error or a state, never
        /// a panic.
        #[test]
        fn arbitrary_state_bytes_never_panic(
            tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            version in 2u32..=8,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let snaps = SnapshotDir::open(dir.path()).unwrap();
            let file = snaps
                .write_current(&SnapshotMeta::default(), &ClusterState::default())
                .unwrap();
            let bytes = std::fs::read(file.path()).unwrap();
            // Keep the prefix and metadata, replace the state.
            let meta_len = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]) as usize;
            let mut body = bytes[..PREFIX_LEN as usize + meta_len].to_vec();
            body.extend_from_slice(&tail);
            let old = rewrite_as(&body, version);
            let path = file.path().to_owned();
            drop(file);
            std::fs::write(&path, &old).unwrap();
            let file = snaps.open_current().unwrap().unwrap();
            let _ = read_snapshot(&file, Verify::Checksum);
        }
    }

    /// A snapshot written by format 3 (no join tokens; with an empty access
    /// log its layout is format 4's without the trailing token map) still
    /// opens, with its state intact.
    #[test]
    fn a_format_3_snapshot_is_read_without_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let snaps = SnapshotDir::open(dir.path()).unwrap();
        let mut state = ClusterState::default();
        state.apply_at(
            1,
            Command::PutMeta {
                request_id: "r1".into(),
                key: "zone".into(),
                value: "b".into(),
            },
        );
        let file = snaps
            .write_current(&SnapshotMeta::default(), &state)
            .unwrap();
        let bytes = std::fs::read(file.path()).unwrap();
        let body = without_history(&bytes);
        let mut old = body[..body.len() - 1].to_vec();
        assert_eq!(body[body.len() - 1], 0, "an empty token map");
        old[8..12].copy_from_slice(&3u32.to_le_bytes());
        let crc = crc32fast::hash(&old);
        old.extend_from_slice(&crc.to_le_bytes());
        let path = file.path().to_owned();
        drop(file);
        std::fs::write(&path, &old).unwrap();
        let file = snaps.open_current().unwrap().unwrap();
        let (_, read) = read_snapshot(&file, Verify::Checksum).unwrap();
        state.start_vm_history_at(0);
        assert_eq!(read, state, "the state comes back whole");
    }

    /// A snapshot written by an older format (2: no access fields)
    /// still opens, with its state intact and an empty access table.
    #[test]
    fn a_format_2_snapshot_is_read_with_an_empty_access_table() {
        let dir = tempfile::tempdir().unwrap();
        let snaps = SnapshotDir::open(dir.path()).unwrap();
        let mut state = ClusterState::default();
        state.apply_at(
            1,
            Command::PutMeta {
                request_id: "r1".into(),
                key: "region".into(),
                value: "eu-west".into(),
            },
        );
        let meta = SnapshotMeta::default();
        let file = snaps.write_current(&meta, &state).unwrap();
        // Rewrite it as format 2 wrote it: version 2, and the state without
        // its trailing access and token fields (an empty map, an empty log,
        // the next sequence number 1 and an empty token map: one byte each
        // in postcard).
        let bytes = std::fs::read(file.path()).unwrap();
        let body = without_history(&bytes);
        let mut old = body[..body.len() - 4].to_vec();
        assert_eq!(&body[body.len() - 4..], &[0, 0, 1, 0]);
        old[8..12].copy_from_slice(&2u32.to_le_bytes());
        let crc = crc32fast::hash(&old);
        old.extend_from_slice(&crc.to_le_bytes());
        let path = file.path().to_owned();
        drop(file);
        std::fs::write(&path, &old).unwrap();

        let file = snaps.open_current().unwrap().unwrap();
        let (_, read) = read_snapshot(&file, Verify::Checksum).unwrap();
        state.start_vm_history_at(0);
        assert_eq!(read, state, "the state comes back whole");
        assert_eq!(
            read.meta("region").map(|m| m.value.as_str()),
            Some("eu-west")
        );

        // A format outside the readable range is still refused, by name.
        old[8..12].copy_from_slice(&1u32.to_le_bytes());
        let body_len = old.len() - TRAILER_LEN as usize;
        let crc = crc32fast::hash(&old[..body_len]);
        old[body_len..].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(&path, &old).unwrap();
        let file = snaps.open_current().unwrap().unwrap();
        let e = read_snapshot(&file, Verify::Checksum).unwrap_err();
        assert!(e.to_string().contains("format version 1"), "{e}");
    }
}
