//! The `process` runtime: a VM's workload is a host process running the
//! spec's `command`, supervised with a restart policy.
//!
//! The command runs in its own process group with stdin from `/dev/null`
//! and stdout and stderr appended to `workload.log` in the VM's state
//! directory (restarts append to the same log). It inherits the node's
//! environment and runs in the VM's state directory. A stop sends SIGTERM
//! to the whole process group, then SIGKILL once the grace has passed.
//!
//! With a [`RunAs`] user (a node running as root always sets one; see the
//! node's `vm.process_user`), the workload runs under that user's uid and
//! gid with no supplementary groups, in `/` (the node's data directory is
//! usually private to the node, so the user could not enter the VM's state
//! directory; and it must not write there: the pidfile and log the node
//! trusts live in it). Its output still reaches `workload.log` through the
//! descriptors the node opened.
//!
//! `vcpus` and `memory_mib` are validated but not enforced: the process
//! runtime is for machines without KVM and for demos, not isolation. A node
//! serves it only when its config enables it (`vm.runtimes`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use rustix::process::Signal;
use tern_protocol::BoxFuture;
use tokio::process::Command;

use crate::metadata;
use crate::network::{Attachment, NodeNetwork, recorded_attachment};
use crate::pidfile::ProcessIdentity;
use crate::spec::RuntimeKind;
use crate::supervisor::{RestartPolicy, Supervisor, Workload, last_line};
use crate::{Observed, Recovered, Runtime, RuntimeError, Started, VmSpec};

/// Name of the workload's log file in its VM directory.
pub const LOG_FILE_NAME: &str = "workload.log";

/// The unprivileged user workloads run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    /// The user's name, for messages.
    pub user: String,
    /// Its uid.
    pub uid: u32,
    /// Its primary gid.
    pub gid: u32,
}

/// Why a user cannot run workloads; each message says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunAsError {
    /// `/etc/passwd` could not be read.
    #[error(
        "cannot read /etc/passwd to find user `{user}`: {reason}; check that the node may read it"
    )]
    Passwd {
        /// The user looked for.
        user: String,
        /// Why it could not be read.
        reason: String,
    },
    /// The user's uid or gid is not a number.
    #[error("user `{user}` has an unreadable {field} `{value}` in /etc/passwd; fix its entry")]
    Unreadable {
        /// The user.
        user: String,
        /// `uid` or `gid`.
        field: &'static str,
        /// What the file says.
        value: String,
    },
    /// The user is root, or in root's group.
    #[error(
        "user `{user}` is root (uid {uid}, gid {gid}); workloads never run as root: name an \
         unprivileged user"
    )]
    Root {
        /// The user.
        user: String,
        /// Its uid.
        uid: u32,
        /// Its primary gid.
        gid: u32,
    },
    /// No such user.
    #[error("no user `{user}` on this machine (create it, or name another)")]
    NoSuchUser {
        /// The user looked for.
        user: String,
    },
}

impl RunAs {
    /// Looks `user` up in `/etc/passwd`. Refuses root (uid 0): the point is
    /// never to run workloads as root.
    pub fn lookup(user: &str) -> Result<RunAs, RunAsError> {
        let passwd = std::fs::read_to_string("/etc/passwd").map_err(|e| RunAsError::Passwd {
            user: user.to_owned(),
            reason: e.to_string(),
        })?;
        RunAs::from_passwd(user, &passwd)
    }

    /// Looks `user` up in the text of a passwd file.
    pub fn from_passwd(user: &str, passwd: &str) -> Result<RunAs, RunAsError> {
        let number = |field: &'static str, value: &str| {
            value.parse::<u32>().map_err(|_| RunAsError::Unreadable {
                user: user.to_owned(),
                field,
                value: value.to_owned(),
            })
        };
        for line in passwd.lines() {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() < 4 || fields[0] != user {
                continue;
            }
            let uid = number("uid", fields[2])?;
            let gid = number("gid", fields[3])?;
            if uid == 0 || gid == 0 {
                return Err(RunAsError::Root {
                    user: user.to_owned(),
                    uid,
                    gid,
                });
            }
            return Ok(RunAs {
                user: user.to_owned(),
                uid,
                gid,
            });
        }
        Err(RunAsError::NoSuchUser {
            user: user.to_owned(),
        })
    }
}

/// The `process` runtime.
pub struct ProcessRuntime {
    supervisor: Supervisor<ProcessWorkload>,
}

impl ProcessRuntime {
    /// A process runtime keeping its state under `state_dir` (one directory
    /// per VM), with the default [`RestartPolicy`], running workloads as
    /// the node's own user.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        ProcessRuntime::with_policy(state_dir, RestartPolicy::default())
    }

    /// A process runtime with a custom restart policy.
    pub fn with_policy(state_dir: impl Into<PathBuf>, policy: RestartPolicy) -> Self {
        ProcessRuntime::with_options(state_dir, policy, None)
    }

    /// A process runtime running workloads as `run_as` (when given).
    pub fn with_options(
        state_dir: impl Into<PathBuf>,
        policy: RestartPolicy,
        run_as: Option<RunAs>,
    ) -> Self {
        ProcessRuntime::with_network(state_dir, policy, run_as, None)
    }

    /// A process runtime whose workloads started with an [`Attachment`]
    /// run in their own network namespace on `network`'s bridge.
    pub fn with_network(
        state_dir: impl Into<PathBuf>,
        policy: RestartPolicy,
        run_as: Option<RunAs>,
        network: Option<Arc<NodeNetwork>>,
    ) -> Self {
        let workload = ProcessWorkload { run_as, network };
        ProcessRuntime {
            supervisor: Supervisor::new(state_dir.into(), workload, policy),
        }
    }
}

struct ProcessWorkload {
    run_as: Option<RunAs>,
    network: Option<Arc<NodeNetwork>>,
}

impl ProcessWorkload {
    /// The command that runs `program` as the workload's user, in
    /// `netns` when given: nsenter and setpriv exec in turn, so the
    /// workload keeps the pid the supervisor spawned; the user is switched
    /// after entering the namespace, which needs root.
    fn program(&self, program: &str, netns: Option<&Path>) -> Command {
        let Some(path) = netns else {
            let mut command = Command::new(program);
            if let Some(run_as) = &self.run_as {
                // std drops supplementary groups when root sets a uid.
                command.uid(run_as.uid).gid(run_as.gid);
            }
            return command;
        };
        let mut command = Command::new("nsenter");
        command.arg(format!("--net={}", path.display())).arg("--");
        if let Some(run_as) = &self.run_as {
            command.args([
                "setpriv".to_owned(),
                format!("--reuid={}", run_as.uid),
                format!("--regid={}", run_as.gid),
                "--clear-groups".to_owned(),
                "--".to_owned(),
            ]);
        }
        command.arg(program);
        command
    }

    /// The workload's attachment and the namespace it runs in, made (or
    /// adopted) now: `None` without an attachment or a node network.
    async fn netns(
        &self,
        vm_id: &str,
        vm_dir: &Path,
    ) -> Result<Option<(Attachment, PathBuf)>, RuntimeError> {
        let attachment = recorded_attachment(vm_dir).map_err(|reason| RuntimeError::Spawn {
            vm_id: vm_id.to_owned(),
            reason: format!("its network attachment: {reason}"),
        })?;
        match (&self.network, attachment) {
            (Some(network), Some(a)) => Ok(Some((a, network.attach_veth(vm_id, &a).await?))),
            (None, Some(_)) => {
                tracing::warn!(
                    vm_id,
                    "VM has an address but this runtime has no network; starting it without one"
                );
                Ok(None)
            }
            (_, None) => Ok(None),
        }
    }
}

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
            let netns = self.netns(vm_id, vm_dir).await?;
            let items = metadata::items(vm_id, &spec.name, netns.as_ref().map(|(a, _)| a));
            metadata::write_files(vm_dir, &items, &spec.user_data).map_err(|source| {
                RuntimeError::State {
                    path: vm_dir.join(metadata::METADATA_FILE_NAME),
                    source,
                }
            })?;
            let mut command = self.program(program, netns.as_ref().map(|(_, p)| p.as_path()));
            command
                .args(args)
                .current_dir(vm_dir)
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log_err);
            metadata::set_env(&mut command, vm_dir, &items, &spec.user_data);
            if self.run_as.is_some() {
                command.current_dir("/").env("HOME", "/");
            }
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

    fn release<'a>(&'a self, vm_id: &'a str) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            if let Some(network) = &self.network {
                network.detach(vm_id).await?;
            }
            Ok(())
        })
    }
}

impl Runtime for ProcessRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Process
    }

    fn start_attached<'a>(
        &'a self,
        vm_id: &'a str,
        spec: &'a VmSpec,
        network: Option<&'a Attachment>,
    ) -> BoxFuture<'a, Result<Started, RuntimeError>> {
        Box::pin(self.supervisor.start(vm_id, spec, network))
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

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n\
        wheelie:x:1000:0:in group root:/home/w:/bin/sh\n\
        broken:x:abc:1:b:/:/bin/sh\n";

    #[test]
    fn users_are_looked_up_and_root_is_refused() {
        assert_eq!(
            RunAs::from_passwd("nobody", PASSWD).unwrap(),
            RunAs {
                user: "nobody".into(),
                uid: 65534,
                gid: 65534
            }
        );
        let err = RunAs::from_passwd("root", PASSWD).unwrap_err();
        assert!(matches!(err, RunAsError::Root { uid: 0, .. }), "{err}");
        assert!(
            err.to_string().contains("name an unprivileged user"),
            "{err}"
        );
        let err = RunAs::from_passwd("wheelie", PASSWD).unwrap_err();
        assert!(err.to_string().contains("gid 0"), "{err}");
        assert_eq!(
            RunAs::from_passwd("broken", PASSWD).unwrap_err(),
            RunAsError::Unreadable {
                user: "broken".into(),
                field: "uid",
                value: "abc".into()
            }
        );
        let err = RunAs::from_passwd("ghost", PASSWD).unwrap_err();
        assert!(matches!(err, RunAsError::NoSuchUser { .. }), "{err}");
        assert!(err.to_string().contains("no user"), "{err}");
    }
}
