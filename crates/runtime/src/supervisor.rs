//! The supervision loop both runtimes share: spawn a workload in its own
//! process group, record its pidfile, restart it on failure with a capped
//! exponential backoff, stop it with a grace period, and adopt workloads an
//! earlier node process left running.
//!
//! A runtime supplies a [`Workload`]: how to build the command for a spec,
//! and how to ask the running workload to stop. Everything else — the table
//! of VMs, the per-VM supervisor task, pidfiles, restart counting — is here.
//!
//! Each supervised VM has one task that owns its child process; the table
//! entry holds what the task reports (an [`Observed`]) and a channel to ask
//! it to stop. Only the task touches the process, so a stop never races a
//! restart.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prost::Message;
use rustix::process::Signal;
use tern_protocol::BoxFuture;
use tern_protocol::pb::VmSpec;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::network::{Attachment, record_attachment};
use crate::pidfile::{self, ProcessIdentity};
use crate::spec::{self, RuntimeKind};
use crate::{ExitStatus, Observed, Recovered, RunState, RuntimeError, Started};

/// Restarts in a row after which a failing workload is given up on: five
/// failures without a stable run in between mean it is broken, not
/// unlucky, and restarting it forever would hide that from the operator.
pub const DEFAULT_MAX_RESTARTS: u32 = 5;

/// Wait before the first restart: long enough that a workload failing at
/// once does not spin the CPU, short enough that a transient failure costs
/// little.
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_millis(500);

/// Ceiling of the doubling backoff, so a workload that recovers is back
/// within half a minute.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A run at least this long counts as healthy and resets the count of
/// failures in a row (not the total shown in [`Observed::restarts`]).
pub const DEFAULT_STABLE_RUN: Duration = Duration::from_secs(60);

/// After the runtime's last polite step (e.g. QMP `quit`), how long to wait
/// for the workload to exit before SIGKILL.
pub const FORCE_EXIT_WAIT: Duration = Duration::from_secs(3);

/// How long to wait for a workload to vanish after SIGKILL. The kernel
/// delivers SIGKILL promptly; this bound only guards against a process
/// stuck in uninterruptible sleep (e.g. on a dead NFS mount).
pub const KILL_WAIT: Duration = Duration::from_secs(5);

/// Bound on each polite stop step a runtime takes (a QMP connection and
/// command for a microVM), so a wedged QEMU cannot delay the SIGKILL that
/// follows: QEMU answers QMP within milliseconds when it is healthy.
pub const STOP_STEP_BOUND: Duration = Duration::from_secs(5);

/// Slack on top of a stop sequence's own bounds before `stop` gives up
/// waiting for the supervisor task (which then still finishes the stop).
const STOP_SLACK: Duration = Duration::from_secs(1);

/// How often an adopted workload (not our child, so it cannot be waited
/// on) is checked for liveness through `/proc`.
pub const ADOPTED_POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Name of the file in a VM's state directory holding the protobuf
/// encoding of the spec its workload was started with.
pub const SPEC_FILE_NAME: &str = "spec.pb";

/// When and how often a failed workload is restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Failures in a row that are restarted; the next one is final and the
    /// VM is reported [`RunState::Failed`].
    pub max_restarts: u32,
    /// Wait before the first restart; doubled for each failure in a row.
    pub initial_backoff: Duration,
    /// Ceiling of the wait between restarts.
    pub max_backoff: Duration,
    /// A run at least this long resets the failures-in-a-row count.
    pub stable_run: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            max_restarts: DEFAULT_MAX_RESTARTS,
            initial_backoff: DEFAULT_INITIAL_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
            stable_run: DEFAULT_STABLE_RUN,
        }
    }
}

impl RestartPolicy {
    /// The wait before restart number `attempt` (1-based) of a run of
    /// failures: `initial_backoff * 2^(attempt-1)`, capped at `max_backoff`.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(31);
        self.initial_backoff
            .saturating_mul(1u32 << doublings)
            .min(self.max_backoff)
    }
}

/// What a runtime plugs into the supervisor.
pub(crate) trait Workload: Send + Sync + 'static {
    /// The runtime kind, checked against each spec.
    fn kind(&self) -> RuntimeKind;

    /// Where the workload's log (output or serial console) goes.
    fn log_path(&self, vm_dir: &Path) -> PathBuf;

    /// Builds the command that runs the VM, stdio included; called for the
    /// first start and for every restart.
    fn command<'a>(
        &'a self,
        vm_id: &'a str,
        vm_dir: &'a Path,
        spec: &'a VmSpec,
    ) -> BoxFuture<'a, Result<Command, RuntimeError>>;

    /// Slow work to do before a start takes the VM table (so that status
    /// calls are not held up), e.g. probing KVM.
    fn prepare<'a>(&'a self, spec: &'a VmSpec) -> BoxFuture<'a, ()>;

    /// A short hint for an operator when the VM is given up on, e.g. the
    /// last line the workload (or QEMU) wrote.
    fn failure_detail(&self, vm_dir: &Path) -> Option<String>;

    /// Politely asks the workload to end. Must return promptly (bounded).
    fn request_stop<'a>(&'a self, vm_dir: &'a Path, process: ProcessIdentity) -> BoxFuture<'a, ()>;

    /// A firmer step once the grace has passed, before SIGKILL; returns
    /// whether it did anything worth waiting [`FORCE_EXIT_WAIT`] for.
    fn before_kill<'a>(&'a self, vm_dir: &'a Path, process: ProcessIdentity)
    -> BoxFuture<'a, bool>;

    /// Removes what the VM held outside its directory (its network
    /// devices), once it has stopped for good.
    fn release<'a>(&'a self, vm_id: &'a str) -> BoxFuture<'a, Result<(), RuntimeError>>;
}

/// One VM in the table.
struct Slot {
    shared: SharedRef,
    /// The encoded spec the workload runs with (empty if unknown).
    spec_bytes: Vec<u8>,
    /// `Some(grace)` asks the task to stop the workload.
    stop_tx: watch::Sender<Option<Duration>>,
    /// Becomes `true` when the task has ended.
    done_rx: watch::Receiver<bool>,
    task: JoinHandle<()>,
}

impl Slot {
    fn is_active(&self) -> bool {
        !*self.done_rx.borrow()
    }
}

/// What the task and the table share for one VM.
#[derive(Debug)]
struct Shared {
    observed: Observed,
}

type SharedRef = Arc<Mutex<Shared>>;

fn update(shared: &SharedRef, f: impl FnOnce(&mut Observed)) {
    let mut guard = shared.lock().unwrap_or_else(PoisonError::into_inner);
    f(&mut guard.observed);
}

fn snapshot(shared: &SharedRef) -> Observed {
    shared
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .observed
        .clone()
}

/// The running workload a task supervises.
enum Live {
    /// Our child: waited on, its exit status known.
    Child(Child, ProcessIdentity),
    /// Left by an earlier node process: polled through `/proc`.
    Adopted(ProcessIdentity),
}

impl Live {
    fn identity(&self) -> ProcessIdentity {
        match self {
            Live::Child(_, id) | Live::Adopted(id) => *id,
        }
    }

    async fn wait(&mut self) -> ExitStatus {
        match self {
            Live::Child(child, _) => match child.wait().await {
                Ok(status) => ExitStatus::from_std(status),
                Err(e) => {
                    tracing::warn!(error = %e, "waiting on workload failed");
                    ExitStatus::Unknown
                }
            },
            Live::Adopted(id) => {
                while id.is_alive() {
                    tokio::time::sleep(ADOPTED_POLL_INTERVAL).await;
                }
                ExitStatus::Unknown
            }
        }
    }
}

/// The supervisor a runtime is built on.
pub(crate) struct Supervisor<W: Workload> {
    root: PathBuf,
    workload: Arc<W>,
    policy: RestartPolicy,
    vms: tokio::sync::Mutex<HashMap<String, Slot>>,
}

impl<W: Workload> Drop for Supervisor<W> {
    fn drop(&mut self) {
        // Supervision ends with the runtime; workloads keep running, as
        // they would if the node crashed, and the next runtime adopts them.
        for slot in self.vms.get_mut().values() {
            slot.task.abort();
        }
    }
}

impl<W: Workload> Supervisor<W> {
    /// A supervisor keeping its VM directories under `root`.
    pub(crate) fn new(root: PathBuf, workload: W, policy: RestartPolicy) -> Self {
        Supervisor {
            root,
            workload: Arc::new(workload),
            policy,
            vms: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn workload(&self) -> &W {
        &self.workload
    }

    pub(crate) fn vm_dir(&self, vm_id: &str) -> Result<PathBuf, RuntimeError> {
        spec::check_vm_id(vm_id).map_err(|reason| RuntimeError::InvalidVmId {
            vm_id: vm_id.to_owned(),
            reason,
        })?;
        Ok(self.root.join(vm_id))
    }

    pub(crate) async fn start(
        &self,
        vm_id: &str,
        spec: &VmSpec,
        network: Option<&Attachment>,
    ) -> Result<Started, RuntimeError> {
        let dir = self.vm_dir(vm_id)?;
        let kind = spec::validate(spec)?;
        if kind != self.workload.kind() {
            return Err(RuntimeError::WrongRuntime {
                wanted: spec.runtime.clone(),
                this: self.workload.kind(),
            });
        }
        let spec_bytes = spec.encode_to_vec();
        let mut prepared = false;
        let mut vms = loop {
            let mut vms = self.vms.lock().await;
            // A start racing a stop waits for the stop to finish, then
            // starts afresh (rather than reporting the stopping VM as
            // running).
            let stopping = vms
                .get(vm_id)
                .filter(|slot| slot.is_active() && slot.stop_tx.borrow().is_some())
                .map(|slot| slot.done_rx.clone());
            if let Some(mut done_rx) = stopping {
                drop(vms);
                let _ = done_rx.wait_for(|done| *done).await;
                continue;
            }
            if let Some(slot) = vms.get(vm_id)
                && slot.is_active()
            {
                if slot.spec_bytes != spec_bytes {
                    return Err(RuntimeError::SpecChanged {
                        vm_id: vm_id.to_owned(),
                    });
                }
                let pid = snapshot(&slot.shared).pid;
                return Ok(Started::AlreadyRunning { pid });
            }
            std::fs::create_dir_all(&dir).map_err(|source| RuntimeError::State {
                path: dir.clone(),
                source,
            })?;
            if let Some(identity) = self.live_pidfile(&dir)? {
                // Left running by an earlier node process: supervise it
                // again, never start it twice.
                let (slot, recorded) = self.adopt(vm_id, &dir, identity);
                let same = recorded == spec_bytes;
                vms.insert(vm_id.to_owned(), slot);
                if !same {
                    tracing::warn!(
                        vm_id,
                        pid = identity.pid,
                        "adopted workload runs another spec"
                    );
                    return Err(RuntimeError::SpecChanged {
                        vm_id: vm_id.to_owned(),
                    });
                }
                return Ok(Started::Adopted { pid: identity.pid });
            }
            if !prepared {
                // Only a spawn needs the (possibly slow) preparation. It
                // runs without the table, so status calls are not held up,
                // and everything above is checked again afterwards.
                drop(vms);
                self.workload.prepare(spec).await;
                prepared = true;
                continue;
            }
            break vms;
        };
        let spec_path = dir.join(SPEC_FILE_NAME);
        std::fs::write(&spec_path, &spec_bytes).map_err(|source| RuntimeError::State {
            path: spec_path,
            source,
        })?;
        record_attachment(&dir, network).map_err(|source| RuntimeError::State {
            path: dir.join(crate::network::ATTACHMENT_FILE_NAME),
            source,
        })?;
        let log_path = self.workload.log_path(&dir);
        let live = spawn(&*self.workload, vm_id, &dir, spec).await?;
        let pid = live.identity().pid;
        let observed = Observed {
            state: RunState::Running,
            exit_status: None,
            log_path,
            restarts: 0,
            pid: Some(pid),
        };
        let slot = self.launch(vm_id, dir, Some(spec.clone()), spec_bytes, live, observed);
        vms.insert(vm_id.to_owned(), slot);
        tracing::info!(vm_id, pid, runtime = %self.workload.kind(), "VM started");
        Ok(Started::Spawned { pid })
    }

    /// The live process named by `dir`'s pidfile; removes a stale pidfile.
    fn live_pidfile(&self, dir: &Path) -> Result<Option<ProcessIdentity>, RuntimeError> {
        let identity = match pidfile::read(dir) {
            Ok(identity) => identity,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                tracing::warn!(error = %e, "ignoring malformed pidfile");
                None
            }
            Err(source) => {
                return Err(RuntimeError::State {
                    path: pidfile::pidfile_path(dir),
                    source,
                });
            }
        };
        match identity {
            Some(id) if id.is_alive() => Ok(Some(id)),
            _ => {
                pidfile::remove(dir).map_err(|source| RuntimeError::State {
                    path: pidfile::pidfile_path(dir),
                    source,
                })?;
                Ok(None)
            }
        }
    }

    /// A slot supervising a live workload we did not spawn; returns it with
    /// the encoded spec recorded beside the pidfile.
    fn adopt(&self, vm_id: &str, dir: &Path, identity: ProcessIdentity) -> (Slot, Vec<u8>) {
        let recorded = std::fs::read(dir.join(SPEC_FILE_NAME)).unwrap_or_default();
        let spec = VmSpec::decode(recorded.as_slice()).ok();
        let observed = Observed {
            state: RunState::Running,
            exit_status: None,
            log_path: self.workload.log_path(dir),
            restarts: 0,
            pid: Some(identity.pid),
        };
        tracing::info!(
            vm_id,
            pid = identity.pid,
            "adopted a workload left by an earlier node process"
        );
        let slot = self.launch(
            vm_id,
            dir.to_owned(),
            spec,
            recorded.clone(),
            Live::Adopted(identity),
            observed,
        );
        (slot, recorded)
    }

    fn launch(
        &self,
        vm_id: &str,
        dir: PathBuf,
        spec: Option<VmSpec>,
        spec_bytes: Vec<u8>,
        live: Live,
        observed: Observed,
    ) -> Slot {
        let shared = Arc::new(Mutex::new(Shared { observed }));
        let (stop_tx, stop_rx) = watch::channel(None);
        let (done_tx, done_rx) = watch::channel(false);
        let task = Task {
            workload: self.workload.clone(),
            policy: self.policy,
            vm_id: vm_id.to_owned(),
            dir,
            spec,
            shared: shared.clone(),
            stop_rx,
        };
        let task = tokio::spawn(async move {
            task.run(live).await;
            let _ = done_tx.send(true);
        });
        Slot {
            shared,
            spec_bytes,
            stop_tx,
            done_rx,
            task,
        }
    }

    pub(crate) async fn stop(
        &self,
        vm_id: &str,
        grace: Duration,
    ) -> Result<Observed, RuntimeError> {
        let dir = self.vm_dir(vm_id)?;
        let (shared, mut done_rx) = {
            let mut vms = self.vms.lock().await;
            if !vms.contains_key(vm_id)
                && let Some(identity) = self.live_pidfile(&dir)?
            {
                let (slot, _) = self.adopt(vm_id, &dir, identity);
                vms.insert(vm_id.to_owned(), slot);
            }
            let slot = vms.get(vm_id).ok_or_else(|| RuntimeError::UnknownVm {
                vm_id: vm_id.to_owned(),
            })?;
            let _ = slot.stop_tx.send(Some(grace));
            (slot.shared.clone(), slot.done_rx.clone())
        };
        // The task's whole stop sequence, plus slack for scheduling.
        let bound = grace + STOP_STEP_BOUND * 2 + FORCE_EXIT_WAIT + KILL_WAIT + STOP_SLACK;
        if tokio::time::timeout(bound, done_rx.wait_for(|done| *done))
            .await
            .is_err()
        {
            tracing::error!(vm_id, ?bound, "workload did not stop within its bound");
        }
        Ok(snapshot(&shared))
    }

    pub(crate) async fn status(&self, vm_id: &str) -> Result<Observed, RuntimeError> {
        self.vm_dir(vm_id)?;
        let vms = self.vms.lock().await;
        vms.get(vm_id)
            .map(|slot| snapshot(&slot.shared))
            .ok_or_else(|| RuntimeError::UnknownVm {
                vm_id: vm_id.to_owned(),
            })
    }

    pub(crate) async fn list(&self) -> Vec<(String, Observed)> {
        let vms = self.vms.lock().await;
        let mut all: Vec<_> = vms
            .iter()
            .map(|(id, slot)| (id.clone(), snapshot(&slot.shared)))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    pub(crate) async fn recover(&self) -> Result<Vec<Recovered>, RuntimeError> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(RuntimeError::State {
                    path: self.root.clone(),
                    source,
                });
            }
        };
        let mut vms = self.vms.lock().await;
        let mut found = Vec::new();
        for entry in entries.flatten() {
            let dir = entry.path();
            let Some(vm_id) = dir.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
                continue;
            };
            if spec::check_vm_id(&vm_id).is_err() || vms.contains_key(&vm_id) {
                continue;
            }
            let had_pidfile = pidfile::pidfile_path(&dir).exists();
            match self.live_pidfile(&dir)? {
                Some(identity) => {
                    let (slot, _) = self.adopt(&vm_id, &dir, identity);
                    vms.insert(vm_id.clone(), slot);
                    found.push(Recovered::Adopted {
                        vm_id,
                        pid: identity.pid,
                    });
                }
                None if had_pidfile => {
                    tracing::info!(vm_id, "removed a stale pidfile");
                    found.push(Recovered::CleanedUp { vm_id });
                }
                None => {}
            }
        }
        Ok(found)
    }

    pub(crate) async fn remove(&self, vm_id: &str, grace: Duration) -> Result<(), RuntimeError> {
        let dir = self.vm_dir(vm_id)?;
        match self.stop(vm_id, grace).await {
            Ok(_) | Err(RuntimeError::UnknownVm { .. }) => {}
            Err(e) => return Err(e),
        }
        self.vms.lock().await.remove(vm_id);
        self.workload.release(vm_id).await?;
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(RuntimeError::State {
                path: dir,
                source: e,
            }),
            _ => Ok(()),
        }
    }
}

/// Spawns the workload for `spec` in its own process group and records its
/// pidfile.
async fn spawn<W: Workload>(
    workload: &W,
    vm_id: &str,
    dir: &Path,
    spec: &VmSpec,
) -> Result<Live, RuntimeError> {
    let mut command = workload.command(vm_id, dir, spec).await?;
    command.process_group(0).kill_on_drop(false);
    let child = command.spawn().map_err(|e| RuntimeError::Spawn {
        vm_id: vm_id.to_owned(),
        reason: e.to_string(),
    })?;
    let pid = child.id().ok_or_else(|| RuntimeError::Spawn {
        vm_id: vm_id.to_owned(),
        reason: "the workload exited before its pid could be read".into(),
    })?;
    // A workload that already exited is a zombie until waited on and has no
    // identity; it gets no pidfile and the task collects its status.
    let identity = ProcessIdentity::of_pid(pid).unwrap_or(ProcessIdentity { pid, start_time: 0 });
    if identity.start_time != 0 {
        pidfile::write(dir, identity).map_err(|source| RuntimeError::State {
            path: pidfile::pidfile_path(dir),
            source,
        })?;
    }
    Ok(Live::Child(child, identity))
}

/// The per-VM supervisor task.
struct Task<W: Workload> {
    workload: Arc<W>,
    policy: RestartPolicy,
    vm_id: String,
    dir: PathBuf,
    /// The spec to restart with; `None` for an adopted workload whose spec
    /// file was unreadable (it is then not restarted).
    spec: Option<VmSpec>,
    shared: SharedRef,
    stop_rx: watch::Receiver<Option<Duration>>,
}

impl<W: Workload> Task<W> {
    async fn run(mut self, mut live: Live) {
        let vm_id = self.vm_id.clone();
        let mut failures_in_a_row: u32 = 0;
        loop {
            let started_at = Instant::now();
            let status = tokio::select! {
                status = live.wait() => status,
                grace = stop_requested(&mut self.stop_rx) => {
                    let status = self.terminate(&mut live, grace).await;
                    self.finish(RunState::Stopped, Some(status));
                    tracing::info!(vm_id, %status, "VM stopped");
                    return;
                }
            };
            self.remove_pidfile();
            update(&self.shared, |o| {
                o.exit_status = Some(status);
                o.pid = None;
            });
            if status.success() {
                self.finish(RunState::Stopped, Some(status));
                tracing::info!(vm_id, "workload ended successfully");
                return;
            }
            if started_at.elapsed() >= self.policy.stable_run {
                failures_in_a_row = 0;
            }
            failures_in_a_row += 1;
            let Some(spec) = self.spec.clone() else {
                let reason = format!(
                    "adopted workload ended ({status}) and its recorded spec is unreadable"
                );
                tracing::warn!(vm_id, reason, "VM failed");
                self.finish(RunState::Failed { reason }, Some(status));
                return;
            };
            if failures_in_a_row > self.policy.max_restarts {
                let mut reason = format!(
                    "workload failed ({status}) {failures_in_a_row} times in a row; \
                     gave up after {} restarts",
                    self.policy.max_restarts
                );
                if let Some(detail) = self.workload.failure_detail(&self.dir) {
                    reason.push_str("; ");
                    reason.push_str(&detail);
                }
                tracing::warn!(vm_id, reason, "VM failed");
                self.finish(RunState::Failed { reason }, Some(status));
                return;
            }
            let delay = self.policy.backoff(failures_in_a_row);
            tracing::info!(vm_id, %status, attempt = failures_in_a_row, ?delay, "workload failed; restarting");
            update(&self.shared, |o| {
                o.state = RunState::Restarting {
                    attempt: failures_in_a_row,
                }
            });
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop_requested(&mut self.stop_rx) => {
                    self.finish(RunState::Stopped, Some(status));
                    return;
                }
            }
            match spawn(&*self.workload, &vm_id, &self.dir, &spec).await {
                Ok(next) => {
                    let pid = next.identity().pid;
                    live = next;
                    update(&self.shared, |o| {
                        o.state = RunState::Running;
                        o.restarts += 1;
                        o.pid = Some(pid);
                    });
                }
                Err(e) => {
                    let reason = format!("restart failed: {e}");
                    tracing::warn!(vm_id, reason, "VM failed");
                    self.finish(RunState::Failed { reason }, Some(status));
                    return;
                }
            }
        }
    }

    fn finish(&self, state: RunState, status: Option<ExitStatus>) {
        self.remove_pidfile();
        update(&self.shared, |o| {
            o.state = state;
            o.exit_status = status.or(o.exit_status);
            o.pid = None;
        });
    }

    fn remove_pidfile(&self) {
        if let Err(e) = pidfile::remove(&self.dir) {
            tracing::warn!(vm_id = self.vm_id, error = %e, "cannot remove pidfile");
        }
    }

    /// Stops the workload: the runtime's polite request, `grace` to act on
    /// it, the runtime's firmer step, then SIGKILL to the process group.
    async fn terminate(&self, live: &mut Live, grace: Duration) -> ExitStatus {
        let identity = live.identity();
        if tokio::time::timeout(
            STOP_STEP_BOUND,
            self.workload.request_stop(&self.dir, identity),
        )
        .await
        .is_err()
        {
            tracing::warn!(vm_id = self.vm_id, "the stop request timed out");
        }
        if let Ok(status) = tokio::time::timeout(grace, live.wait()).await {
            return status;
        }
        tracing::info!(
            vm_id = self.vm_id,
            ?grace,
            "grace expired; forcing the workload to stop"
        );
        let forced = tokio::time::timeout(
            STOP_STEP_BOUND,
            self.workload.before_kill(&self.dir, identity),
        )
        .await
        .unwrap_or(false);
        if forced && let Ok(status) = tokio::time::timeout(FORCE_EXIT_WAIT, live.wait()).await {
            return status;
        }
        if let Err(e) = identity.signal_group(Signal::KILL) {
            tracing::warn!(vm_id = self.vm_id, error = %e, "SIGKILL to the process group failed");
        }
        match tokio::time::timeout(KILL_WAIT, live.wait()).await {
            Ok(status) => status,
            Err(_) => {
                tracing::error!(
                    vm_id = self.vm_id,
                    pid = identity.pid,
                    "workload survived SIGKILL"
                );
                ExitStatus::Unknown
            }
        }
    }
}

/// How much of a log's end [`last_line`] reads: one line of context.
const LAST_LINE_WINDOW: u64 = 4096;

/// Longest hint [`last_line`] returns, so a failure reason stays a line.
const MAX_DETAIL_CHARS: usize = 200;

/// The last non-empty line of the log at `path`, shortened to
/// [`MAX_DETAIL_CHARS`], for failure reasons.
pub(crate) fn last_line(path: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(LAST_LINE_WINDOW)))
        .ok()?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail).ok()?;
    let text = String::from_utf8_lossy(&tail);
    let line = text.lines().rev().map(str::trim).find(|l| !l.is_empty())?;
    Some(line.chars().take(MAX_DETAIL_CHARS).collect())
}

/// Resolves with the grace once a stop is requested; never if the runtime
/// was dropped (its tasks are aborted then anyway).
async fn stop_requested(stop_rx: &mut watch::Receiver<Option<Duration>>) -> Duration {
    let grace = stop_rx
        .wait_for(Option::is_some)
        .await
        .map(|grace| grace.unwrap_or_default());
    match grace {
        Ok(grace) => grace,
        Err(_) => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_ceiling() {
        let policy = RestartPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            ..RestartPolicy::default()
        };
        assert_eq!(policy.backoff(1), Duration::from_millis(100));
        assert_eq!(policy.backoff(2), Duration::from_millis(200));
        assert_eq!(policy.backoff(4), Duration::from_millis(800));
        assert_eq!(policy.backoff(5), Duration::from_secs(1));
        assert_eq!(policy.backoff(1000), Duration::from_secs(1));
    }
}
