//! [`TernProcess`]: one `tern` child process.
//!
//! The caller prepares the command ([`TernProcess::command`] for the
//! usual `tern run --config FILE`, or its own, e.g. wrapped in
//! `ip netns exec NS`) with its environment and process group; the kit
//! adds the log file (stdout and stderr appended), a null stdin, and owns
//! the child from then on:
//!
//! - [`TernProcess::wait_node_file`] (async) and
//!   [`TernProcess::wait_node_file_blocking`] wait, bounded, until the
//!   node has written `DATA_DIR/node.json` *with its own pid* (a file left
//!   by an earlier run of the same data directory does not count), and
//!   fail early, quoting the log's end, when the child exits first;
//! - [`TernProcess::stop`] / [`TernProcess::stop_blocking`]: SIGTERM, a
//!   bounded wait, SIGKILL after;
//! - dropping a `TernProcess` SIGKILLs and reaps a child still running,
//!   on every exit path (a failed test, a panic, an error).
//!
//! Workloads a node started are not the kit's business: a harness that
//! runs VMs kills leftovers from the data directory itself.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde::de::DeserializeOwned;

/// The file a node writes into its data directory once it serves (the
/// node's `NODE_INFO_FILE`; `tern-testkit` checks the two agree).
pub const NODE_FILE: &str = "node.json";

/// How often a wait looks at the node file and the child.
pub const POLL: Duration = Duration::from_millis(100);

/// How many of the log's last lines an error quotes.
pub const LOG_TAIL_LINES: usize = 30;

/// Why a `tern` process could not be started or did not come up.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The log file could not be opened.
    #[error("opening the log {path}: {source}")]
    Log {
        /// The log file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The program could not be started.
    #[error("starting {program}: {source}")]
    Spawn {
        /// The program, as given.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// The child exited before it wrote its node file.
    #[error("the node in {dir} exited while starting ({status}); its log ends:\n{tail}")]
    Exited {
        /// Its data directory.
        dir: PathBuf,
        /// How it exited.
        status: ExitStatus,
        /// The last lines of its log.
        tail: String,
    },
    /// The child did not write its node file in time (it keeps running;
    /// drop the process to kill it).
    #[error("the node in {dir} did not start within {bound:?}; its log ends:\n{tail}")]
    StartTimeout {
        /// Its data directory.
        dir: PathBuf,
        /// The bound that passed.
        bound: Duration,
        /// The last lines of its log.
        tail: String,
    },
}

/// One `tern` child: killed (SIGKILL) and reaped on drop if still running.
#[derive(Debug)]
pub struct TernProcess {
    child: Child,
    data_dir: PathBuf,
    log: PathBuf,
}

/// Only the field every node file has, to tell whose file it is.
#[derive(Deserialize)]
struct Pid {
    pid: u32,
}

impl TernProcess {
    /// `tern run --config CONFIG`: the usual command, to which the caller
    /// may add environment variables or a process group before
    /// [`TernProcess::spawn`].
    pub fn command(tern: &Path, config: &Path) -> Command {
        let mut cmd = Command::new(tern);
        cmd.arg("run").arg("--config").arg(config);
        cmd
    }

    /// Starts `cmd` with stdin null and stdout and stderr appended to
    /// `log`; `data_dir` is where the node writes its node file.
    pub fn spawn(
        mut cmd: Command,
        data_dir: impl Into<PathBuf>,
        log: impl Into<PathBuf>,
    ) -> Result<TernProcess, ProcessError> {
        let log = log.into();
        let open = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
        };
        let (out, err) = match open().and_then(|f| Ok((f.try_clone()?, f))) {
            Ok(files) => files,
            Err(source) => return Err(ProcessError::Log { path: log, source }),
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|source| ProcessError::Spawn {
                program: cmd.get_program().to_string_lossy().into_owned(),
                source,
            })?;
        Ok(TernProcess {
            child,
            data_dir: data_dir.into(),
            log,
        })
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The log so far (empty when it cannot be read).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log(), n)
    }

    /// Sends `sig` (nothing when the child has been reaped).
    pub fn signal(&self, sig: rustix::process::Signal) {
        if let Some(pid) = i32::try_from(self.pid())
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        {
            let _ = rustix::process::kill_process(pid, sig);
        }
    }

    /// The exit status, once it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        self.try_wait().is_none()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// One look: the node file when the node wrote it, `None` while it
    /// has not, an error when the child exited first.
    pub fn poll_node_file<T: DeserializeOwned>(&mut self) -> Result<Option<T>, ProcessError> {
        if let Ok(text) = std::fs::read_to_string(self.data_dir.join(NODE_FILE))
            && let Ok(Pid { pid }) = serde_json::from_str::<Pid>(&text)
            && pid == self.pid()
            && let Ok(file) = serde_json::from_str::<T>(&text)
        {
            return Ok(Some(file));
        }
        if let Some(status) = self.try_wait() {
            return Err(ProcessError::Exited {
                dir: self.data_dir.clone(),
                status,
                tail: self.log_tail(LOG_TAIL_LINES),
            });
        }
        Ok(None)
    }

    fn start_timeout(&self, bound: Duration) -> ProcessError {
        ProcessError::StartTimeout {
            dir: self.data_dir.clone(),
            bound,
            tail: self.log_tail(LOG_TAIL_LINES),
        }
    }

    /// Waits (at most `bound`) until the node wrote its node file; parses
    /// it as `T` (the node's `NodeFile`, or any subset of its fields).
    pub async fn wait_node_file<T: DeserializeOwned>(
        &mut self,
        bound: Duration,
    ) -> Result<T, ProcessError> {
        let deadline = Instant::now() + bound;
        loop {
            if let Some(file) = self.poll_node_file()? {
                return Ok(file);
            }
            if Instant::now() > deadline {
                return Err(self.start_timeout(bound));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// [`TernProcess::wait_node_file`] for callers without a runtime.
    pub fn wait_node_file_blocking<T: DeserializeOwned>(
        &mut self,
        bound: Duration,
    ) -> Result<T, ProcessError> {
        let deadline = Instant::now() + bound;
        loop {
            if let Some(file) = self.poll_node_file()? {
                return Ok(file);
            }
            if Instant::now() > deadline {
                return Err(self.start_timeout(bound));
            }
            std::thread::sleep(POLL);
        }
    }

    /// SIGTERM, then waits up to `bound` for the exit and SIGKILLs after.
    /// Returns the exit status when it exited by itself.
    pub async fn stop(&mut self, bound: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.try_wait() {
            return Some(status);
        }
        self.signal(rustix::process::Signal::TERM);
        let deadline = Instant::now() + bound;
        while Instant::now() < deadline {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(POLL / 2).await;
        }
        self.kill();
        None
    }

    /// [`TernProcess::stop`] for callers without a runtime.
    pub fn stop_blocking(&mut self, bound: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.try_wait() {
            return Some(status);
        }
        self.signal(rustix::process::Signal::TERM);
        let deadline = Instant::now() + bound;
        while Instant::now() < deadline {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            std::thread::sleep(POLL / 2);
        }
        self.kill();
        None
    }
}

impl Drop for TernProcess {
    fn drop(&mut self) {
        if self.is_running() {
            self.kill();
        }
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // reason: tests; a failure should fail the test loudly.

    use super::*;

    /// A stand-in for `tern run`: a shell that writes a node file with
    /// its own pid after a moment, then waits for a signal.
    fn fake_node(dir: &Path, script: &str) -> TernProcess {
        std::fs::create_dir_all(dir).unwrap();
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(script).current_dir(dir);
        TernProcess::spawn(cmd, dir, dir.join("log")).unwrap()
    }

    #[test]
    fn waits_for_its_own_node_file_and_stops() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path();
        // A stale file of another pid must not count.
        std::fs::write(dir.join(NODE_FILE), r#"{"pid": 1, "id": "stale"}"#).unwrap();
        let mut p = fake_node(
            dir,
            r#"echo starting; sleep 0.3; printf '{"pid": %s, "id": "fresh"}' $$ > node.json; exec sleep 30"#,
        );
        #[derive(Deserialize)]
        struct File {
            id: String,
        }
        let f: File = p.wait_node_file_blocking(Duration::from_secs(10)).unwrap();
        assert_eq!(f.id, "fresh");
        assert!(p.log().contains("starting"));
        assert!(p.is_running());
        // `sleep` dies of SIGTERM: not a clean exit, but an exit.
        let status = p.stop_blocking(Duration::from_secs(5)).unwrap();
        assert!(!status.success());
    }

    #[test]
    fn an_early_exit_is_an_error_quoting_the_log() {
        let base = tempfile::tempdir().unwrap();
        let mut p = fake_node(base.path(), "echo 'config error: listen.grpc'; exit 2");
        let e = p
            .wait_node_file_blocking::<serde_json::Value>(Duration::from_secs(10))
            .unwrap_err();
        assert!(matches!(e, ProcessError::Exited { .. }), "{e}");
        assert!(e.to_string().contains("listen.grpc"), "{e}");
    }

    #[tokio::test]
    async fn a_silent_node_times_out_and_is_killed_on_drop() {
        let base = tempfile::tempdir().unwrap();
        let mut p = fake_node(base.path(), "exec sleep 30");
        let e = p
            .wait_node_file::<serde_json::Value>(Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(e, ProcessError::StartTimeout { .. }), "{e}");
        let pid = i32::try_from(p.pid()).unwrap();
        drop(p);
        // Reaped: the pid no longer names our child.
        let alive =
            rustix::process::test_kill_process(rustix::process::Pid::from_raw(pid).unwrap())
                .is_ok();
        assert!(!alive, "the child outlived its handle");
    }
}
