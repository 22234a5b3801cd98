//! The `process` runtime: a VM's workload is a host process running the
//! spec's `command`, supervised with a restart policy.
//!
//! The command runs in its own process group with stdin from `/dev/null`
//! and stdout and stderr appended to `workload.log` in the VM's state
//! directory (restarts append to the same log). It inherits the node's
//! environment and runs in the VM's state directory. A stop sends SIGTERM
//! to the whole process group, then SIGKILL once the grace has passed.
//!
//! `vcpus` and `memory_mib` are validated but not enforced: the process
//! runtime is for machines without KVM and for demos, not isolation.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use rustix::process::Signal;
use tern_protocol::BoxFuture;
use tokio::process::Command;

use super::pidfile::ProcessIdentity;
use super::spec::RuntimeKind;
use super::supervisor::{RestartPolicy, Supervisor, Workload, last_line};
use super::{Observed, Recovered, Runtime, RuntimeError, Started, VmSpec};

/// Name of the workload's log file in its VM directory.
pub const LOG_FILE_NAME: &str = "workload.log";

/// The `process` runtime.
pub struct ProcessRuntime {
    supervisor: Supervisor<ProcessWorkload>,
}

impl ProcessRuntime {
    /// A process runtime keeping its state under `state_dir` (one directory
    /// per VM), with the default [`RestartPolicy`].
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        ProcessRuntime::with_policy(state_dir, RestartPolicy::default())
    }

    /// A process runtime with a custom restart policy.
    pub fn with_policy(state_dir: impl Into<PathBuf>, policy: RestartPolicy) -> Self {
        ProcessRuntime {
            supervisor: Supervisor::new(state_dir.into(), ProcessWorkload, policy),
        }
    }
}

struct ProcessWorkload;

impl Workload for ProcessWorkload {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Process
    }

    fn log_path(&self, vm_dir: &Path) -> PathBuf {
        vm_dir.join(LOG_FILE_NAME)
    }

    fn command<'a>(
        &'a self,
        vm_id: &'a str,
        vm_dir: &'a Path,
        spec: &'a VmSpec,
    ) -> BoxFuture<'a, Result<Command, RuntimeError>> {
        Box::pin(async move {
            let (program, args) =
                spec.command
                    .split_first()
                    .ok_or_else(|| RuntimeError::Spawn {
                        vm_id: vm_id.to_owned(),
                        reason: "empty command".into(),
                    })?;
            let log_path = self.log_path(vm_dir);
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .map_err(|source| RuntimeError::State {
                    path: log_path.clone(),
                    source,
                })?;
            let log_err = log.try_clone().map_err(|source| RuntimeError::State {
                path: log_path,
                source,
            })?;
            let mut command = Command::new(program);
            command
                .args(args)
                .current_dir(vm_dir)
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log_err);
            Ok(command)
        })
    }

    fn prepare<'a>(&'a self, _spec: &'a VmSpec) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }

    fn failure_detail(&self, vm_dir: &Path) -> Option<String> {
        last_line(&self.log_path(vm_dir)).map(|line| format!("last output: {line}"))
    }

    fn request_stop<'a>(
        &'a self,
        _vm_dir: &'a Path,
        process: ProcessIdentity,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if let Err(e) = process.signal_group(Signal::TERM) {
                tracing::debug!(pid = process.pid, error = %e, "SIGTERM to the process group failed");
            }
        })
    }

    fn before_kill<'a>(
        &'a self,
        _vm_dir: &'a Path,
        _process: ProcessIdentity,
    ) -> BoxFuture<'a, bool> {
        Box::pin(async { false })
    }
}

impl Runtime for ProcessRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Process
    }

    fn start<'a>(
        &'a self,
        vm_id: &'a str,
        spec: &'a VmSpec,
    ) -> BoxFuture<'a, Result<Started, RuntimeError>> {
        Box::pin(self.supervisor.start(vm_id, spec))
    }

    fn stop<'a>(
        &'a self,
        vm_id: &'a str,
        grace: Duration,
    ) -> BoxFuture<'a, Result<Observed, RuntimeError>> {
        Box::pin(self.supervisor.stop(vm_id, grace))
    }

    fn status<'a>(&'a self, vm_id: &'a str) -> BoxFuture<'a, Result<Observed, RuntimeError>> {
        Box::pin(self.supervisor.status(vm_id))
    }

    fn list(&self) -> BoxFuture<'_, Vec<(String, Observed)>> {
        Box::pin(self.supervisor.list())
    }

    fn recover(&self) -> BoxFuture<'_, Result<Vec<Recovered>, RuntimeError>> {
        Box::pin(self.supervisor.recover())
    }

    fn remove<'a>(
        &'a self,
        vm_id: &'a str,
        grace: Duration,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(self.supervisor.remove(vm_id, grace))
    }
}
