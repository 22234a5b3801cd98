//! The reconciler: each node runs one. It watches the applied cluster
//! state and makes its runtimes match the desired state of the VMs placed
//! on it, then reports what it observes back through Raft.
//!
//! # One pass
//!
//! A pass runs on every Raft status change (new entries applied) and every
//! [`RECONCILE_INTERVAL`] (to notice workloads that changed on their own).
//! It acts only while the node is caught up (a leader is known and the
//! applied index is within [`MAX_APPLY_LAG`] of the commit index, see
//! [`RaftStatus::is_caught_up`](crate::consensus::RaftStatus::is_caught_up)):
//! a node replaying its log must not stop or remove VMs on the strength of
//! an old state. For each VM placed on this node:
//!
//! - **desired `Deleted`**: remove it from its runtime (stop, delete its
//!   directory), report `Deleted`; the state then drops the record.
//! - **migrating away, or desired `Stopped`**: stop it, report `Stopped`
//!   (or `Failed` if that is how it ended). For a migration that report is
//!   the hand-over step: the state moves the record to the target, whose
//!   reconciler starts it. The target never starts a VM before the source
//!   has reported it stopped, so a VM never runs twice; a crash of either
//!   node in between leaves a record the restarted reconciler finishes
//!   (the source stops and reports; the target starts), and an operator can
//!   roll back by migrating the VM to its current node until the hand-over.
//! - **desired `Running`**: start it when the runtime does not run it and
//!   the record says it should be running (`Pending`, or `Running` after a
//!   node restart: the runtime adopts a workload that outlived the node,
//!   see [`Runtime::recover`]). A VM observed `Stopped` or `Failed` (it
//!   ended on its own) is left alone until an operator starts it again. A
//!   start that fails is retried with capped exponential backoff, at most
//!   [`ReconcilerConfig::max_start_attempts`] times, then reported
//!   `Failed` with the reason.
//!
//! Workloads a runtime knows that are placed on no node, or on another
//! node (a finished migration's source), are removed. Reports are written
//! only when they change the record, each with a fresh request id.
//!
//! On a follower [`Consensus::write`] may answer `NotLeader`; the report
//! is then retried on a later pass (the node's `Consensus` should forward
//! writes to the leader for reports to land promptly).
//!
//! VMs are handled one after another; every runtime call is bounded by
//! [`ReconcilerConfig::op_timeout`].

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tern_state::{Command, NodeId, Response, VmRecord, VmReport, VmState};

use crate::consensus::{Consensus, MAX_APPLY_LAG, write_bounded};
use crate::vm::to_pb_spec;
use tern_protocol::pb;
use tern_runtime::{Attachment, Observed, RunState, Runtime, RuntimeError, RuntimeKind, Started};

/// How often a pass runs when no Raft change wakes the reconciler: quick
/// enough that a crashed workload shows in the VM's status within seconds,
/// slow enough that an idle node does little.
pub const RECONCILE_INTERVAL: Duration = Duration::from_secs(2);

/// Start attempts for one VM before it is reported `Failed`: enough to
/// ride out a transient failure (a busy disk, a port still held), few
/// enough that a broken spec is reported within a minute.
pub const DEFAULT_MAX_START_ATTEMPTS: u32 = 4;

/// Delay before the first retry of a failed start; doubled per attempt.
pub const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_secs(1);

/// The longest delay between start retries.
pub const DEFAULT_MAX_RETRY_BACKOFF: Duration = Duration::from_secs(30);

/// Bound on one runtime call: a microVM start probes KVM and boots QEMU;
/// a stop waits up to its grace, then kills. Two minutes covers both with
/// room, and a runtime wedged past it is reported instead of waited on.
pub const RUNTIME_OP_TIMEOUT: Duration = Duration::from_secs(120);

/// A reconciler's settings; [`ReconcilerConfig::default`] holds the named
/// constants.
#[derive(Debug, Clone)]
pub struct ReconcilerConfig {
    /// See [`RECONCILE_INTERVAL`].
    pub interval: Duration,
    /// Grace a workload gets to stop before it is killed.
    pub stop_grace: Duration,
    /// See [`DEFAULT_MAX_START_ATTEMPTS`].
    pub max_start_attempts: u32,
    /// See [`DEFAULT_RETRY_BACKOFF`].
    pub retry_backoff: Duration,
    /// See [`DEFAULT_MAX_RETRY_BACKOFF`].
    pub max_retry_backoff: Duration,
    /// See [`RUNTIME_OP_TIMEOUT`].
    pub op_timeout: Duration,
}

impl Default for ReconcilerConfig {
    fn default() -> Self {
        ReconcilerConfig {
            interval: RECONCILE_INTERVAL,
            stop_grace: tern_runtime::DEFAULT_STOP_GRACE,
            max_start_attempts: DEFAULT_MAX_START_ATTEMPTS,
            retry_backoff: DEFAULT_RETRY_BACKOFF,
            max_retry_backoff: DEFAULT_MAX_RETRY_BACKOFF,
            op_timeout: RUNTIME_OP_TIMEOUT,
        }
    }
}

/// What one pass did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Pass {
    /// Why the pass did nothing, when it did nothing (not caught up).
    pub waiting: Option<String>,
    /// VMs placed on this node that it looked at.
    pub vms: usize,
    /// Reports written.
    pub reports: usize,
    /// Runtime calls or writes that failed (retried on a later pass).
    pub errors: usize,
}

/// What a VM is given besides its spec: its lease (when it has one) and
/// the operator's user data.
#[derive(Clone, Copy)]
struct Guest<'a> {
    network: Option<&'a Attachment>,
    user_data: &'a str,
}

/// Start attempts of one VM.
#[derive(Debug, Clone, Copy)]
struct Retry {
    attempts: u32,
    not_before: Instant,
}

/// A runtime call that did not succeed.
#[derive(Debug, thiserror::Error)]
enum OpError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("the runtime did not answer within {0:?}")]
    TimedOut(Duration),
}

/// A node's reconciler.
pub struct Reconciler {
    node_id: NodeId,
    consensus: Arc<dyn Consensus>,
    runtimes: Vec<Arc<dyn Runtime>>,
    config: ReconcilerConfig,
    retries: HashMap<String, Retry>,
    /// Makes report request ids unique across node restarts.
    report_prefix: String,
    report_seq: u64,
}

impl Reconciler {
    /// A reconciler for node `node_id`, driving `runtimes` (at most one per
    /// [`RuntimeKind`]; a VM asking for a kind this node lacks is reported
    /// `Failed`).
    pub fn new(
        node_id: NodeId,
        consensus: Arc<dyn Consensus>,
        runtimes: Vec<Arc<dyn Runtime>>,
        config: ReconcilerConfig,
    ) -> Reconciler {
        let boot = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Reconciler {
            node_id,
            consensus,
            runtimes,
            config,
            retries: HashMap::new(),
            report_prefix: format!("report-{node_id}-{boot:x}"),
            report_seq: 0,
        }
    }

    /// Recovers what the runtimes left running, then reconciles until
    /// `shutdown` resolves (checked between passes; a pass is bounded by
    /// the runtime call bound per VM) or Raft's status is gone.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let mut shutdown = std::pin::pin!(shutdown);
        self.recover().await;
        let mut status = self.consensus.status();
        loop {
            let pass = self.reconcile_once().await;
            tracing::debug!(?pass, node = self.node_id, "reconcile pass");
            tokio::select! {
                _ = &mut shutdown => break,
                changed = status.changed() => if changed.is_err() {
                    tracing::info!(node = self.node_id, "Raft status closed; reconciler stops");
                    break;
                },
                _ = tokio::time::sleep(self.config.interval) => {}
            }
        }
        tracing::info!(node = self.node_id, "reconciler stopped");
    }

    /// Adopts workloads that outlived an earlier node process.
    pub async fn recover(&self) {
        for rt in &self.runtimes {
            match tokio::time::timeout(self.config.op_timeout, rt.recover()).await {
                Ok(Ok(found)) => {
                    for r in found {
                        tracing::info!(runtime = %rt.kind(), ?r, "recovered after a node restart");
                    }
                }
                Ok(Err(e)) => tracing::warn!(runtime = %rt.kind(), error = %e, "recovery failed"),
                Err(_) => tracing::warn!(runtime = %rt.kind(), "recovery timed out"),
            }
        }
    }

    /// One reconcile pass (see the module docs).
    pub async fn reconcile_once(&mut self) -> Pass {
        let mut pass = Pass::default();
        let status = self.consensus.current_status();
        if !status.is_caught_up(MAX_APPLY_LAG) {
            let why = status.lag_reason(MAX_APPLY_LAG);
            tracing::debug!(node = self.node_id, %why, "not reconciling yet");
            pass.waiting = Some(why);
            return pass;
        }
        let me = self.node_id;
        let read = self.consensus.query(|state| {
            let mine: Vec<(VmRecord, Option<Attachment>, String)> = state
                .vms()
                .values()
                .filter(|vm| vm.node_id == me)
                .map(|vm| {
                    let network =
                        crate::vm::network_of(state, &vm.id).map(|(lease, pool)| Attachment {
                            address: lease.address,
                            mac: lease.mac,
                            pool,
                        });
                    (vm.clone(), network, state.user_data(&vm.id).to_owned())
                })
                .collect();
            let placed: BTreeMap<String, NodeId> = state
                .vms()
                .iter()
                .map(|(id, vm)| (id.clone(), vm.node_id))
                .collect();
            (mine, placed)
        });
        let (mine, placed) = match read {
            Ok(r) => r,
            Err(e) => {
                pass.waiting = Some(e.to_string());
                return pass;
            }
        };
        pass.vms = mine.len();
        let mut known: BTreeMap<String, (usize, Observed)> = BTreeMap::new();
        for (i, rt) in self.runtimes.iter().enumerate() {
            for (id, observed) in rt.list().await {
                known.insert(id, (i, observed));
            }
        }
        for (vm, network, user_data) in &mine {
            let known_here = known.get(&vm.id).map(|(_, o)| o.clone());
            let guest = Guest {
                network: network.as_ref(),
                user_data,
            };
            self.reconcile_vm(vm, guest, known_here, &mut pass).await;
        }
        for (id, (i, _)) in &known {
            if placed.get(id) == Some(&me) {
                continue;
            }
            let Some(rt) = self.runtimes.get(*i) else {
                continue;
            };
            tracing::info!(vm = %id, placed_on = ?placed.get(id), "removing a workload not placed on this node");
            match self.op(rt.remove(id, self.config.stop_grace)).await {
                Ok(()) | Err(OpError::Runtime(RuntimeError::UnknownVm { .. })) => {}
                Err(e) => {
                    pass.errors += 1;
                    tracing::warn!(vm = %id, error = %e, "removing an orphan workload failed");
                }
            }
        }
        self.retries.retain(|id, _| placed.get(id) == Some(&me));
        pass
    }

    async fn op<T>(
        &self,
        fut: impl Future<Output = Result<T, RuntimeError>>,
    ) -> Result<T, OpError> {
        match tokio::time::timeout(self.config.op_timeout, fut).await {
            Ok(r) => r.map_err(OpError::from),
            Err(_) => Err(OpError::TimedOut(self.config.op_timeout)),
        }
    }

    fn runtime_for(&self, vm: &VmRecord) -> Option<Arc<dyn Runtime>> {
        let kind = RuntimeKind::parse(&vm.spec.runtime)?;
        self.runtimes.iter().find(|rt| rt.kind() == kind).cloned()
    }

    async fn reconcile_vm(
        &mut self,
        vm: &VmRecord,
        guest: Guest<'_>,
        known: Option<Observed>,
        pass: &mut Pass,
    ) {
        let id = vm.id.as_str();
        let Some(rt) = self.runtime_for(vm) else {
            let reason = format!(
                "runtime {:?} is not available on node {}",
                vm.spec.runtime, self.node_id
            );
            let state = if vm.desired == VmState::Deleted {
                VmState::Deleted
            } else if vm.is_migrating() {
                VmState::Stopped
            } else {
                VmState::Failed
            };
            self.report(vm, state, reason, String::new(), pass).await;
            return;
        };
        let grace = self.config.stop_grace;
        if vm.desired == VmState::Deleted {
            match self.op(rt.remove(id, grace)).await {
                Ok(()) | Err(OpError::Runtime(RuntimeError::UnknownVm { .. })) => {
                    tracing::info!(vm = id, "removed");
                    self.report(vm, VmState::Deleted, String::new(), String::new(), pass)
                        .await;
                }
                Err(e) => {
                    pass.errors += 1;
                    tracing::warn!(vm = id, error = %e, "removing failed; retrying next pass");
                }
            }
            return;
        }
        if vm.is_migrating() || vm.desired == VmState::Stopped {
            let observed = match known {
                Some(o) if o.state.is_active() => match self.op(rt.stop(id, grace)).await {
                    Ok(o) => {
                        tracing::info!(vm = id, migrating_to = vm.migrate_to, "stopped");
                        Some(o)
                    }
                    Err(e) => {
                        pass.errors += 1;
                        tracing::warn!(vm = id, error = %e, "stopping failed; retrying next pass");
                        return;
                    }
                },
                other => other,
            };
            let (state, reason, log) = match &observed {
                Some(o) => describe(o),
                None => (VmState::Stopped, String::new(), vm.log_path.clone()),
            };
            // A stop that ends in anything but a failure is a stop.
            let state = if state == VmState::Failed {
                VmState::Failed
            } else {
                VmState::Stopped
            };
            self.report(vm, state, reason, log, pass).await;
            return;
        }
        if vm.desired != VmState::Running {
            return;
        }
        let active = known.as_ref().is_some_and(|o| o.state.is_active());
        let need_start = match &known {
            None => vm.observed != VmState::Failed && vm.observed != VmState::Stopped,
            Some(_) if active => false,
            Some(_) => vm.observed == VmState::Pending,
        };
        if need_start {
            let now = Instant::now();
            if self.retries.get(id).is_some_and(|r| r.not_before > now) {
                return;
            }
            let spec = pb::VmSpec {
                user_data: guest.user_data.to_owned(),
                ..to_pb_spec(&vm.spec)
            };
            match self.op(rt.start_attached(id, &spec, guest.network)).await {
                Ok(started) => {
                    self.retries.remove(id);
                    match started {
                        Started::Spawned { pid } => tracing::info!(vm = id, pid, "started"),
                        Started::Adopted { pid } => tracing::info!(vm = id, pid, "adopted"),
                        Started::AlreadyRunning { .. } => {}
                    }
                }
                Err(e) => {
                    pass.errors += 1;
                    let retry = self.retries.entry(id.to_owned()).or_insert(Retry {
                        attempts: 0,
                        not_before: now,
                    });
                    retry.attempts += 1;
                    if retry.attempts >= self.config.max_start_attempts {
                        let attempts = retry.attempts;
                        self.retries.remove(id);
                        tracing::warn!(vm = id, attempts, error = %e, "start failed; giving up");
                        let reason = format!("start failed {attempts} times: {e}");
                        self.report(vm, VmState::Failed, reason, vm.log_path.clone(), pass)
                            .await;
                    } else {
                        let backoff = self
                            .config
                            .retry_backoff
                            .saturating_mul(1 << retry.attempts.saturating_sub(1).min(16))
                            .min(self.config.max_retry_backoff);
                        retry.not_before = now + backoff;
                        tracing::warn!(vm = id, attempt = retry.attempts, ?backoff, error = %e, "start failed; will retry");
                    }
                    return;
                }
            }
        } else if known.is_none() {
            return;
        }
        match self.op(rt.status(id)).await {
            Ok(o) => {
                let (state, reason, log) = describe(&o);
                self.report(vm, state, reason, log, pass).await;
            }
            Err(e) => {
                pass.errors += 1;
                tracing::warn!(vm = id, error = %e, "reading status failed");
            }
        }
    }

    /// Writes a report when it changes the record (always while migrating:
    /// the report is the hand-over step).
    async fn report(
        &mut self,
        vm: &VmRecord,
        observed: VmState,
        mut reason: String,
        mut log_path: String,
        pass: &mut Pass,
    ) {
        // Within the write limits, before comparing with what the record
        // holds (which was cut the same way).
        tern_state::limits::truncate(&mut reason, tern_state::limits::MAX_VM_REASON_LEN);
        tern_state::limits::truncate(&mut log_path, tern_state::limits::MAX_PATH_LEN);
        if !vm.is_migrating()
            && vm.observed == observed
            && vm.reason == reason
            && vm.log_path == log_path
        {
            return;
        }
        self.report_seq += 1;
        let command = Command::ReportVm {
            request_id: format!("{}-{}", self.report_prefix, self.report_seq),
            report: VmReport {
                vm_id: vm.id.clone(),
                node_id: self.node_id,
                observed,
                reason: reason.clone(),
                log_path,
            },
        };
        match write_bounded(&*self.consensus, command).await {
            Ok(Response::Vm(after)) => {
                pass.reports += 1;
                tracing::info!(vm = %vm.id, ?observed, %reason, now_on = after.node_id, "reported");
            }
            Ok(Response::Rejected(why)) => {
                tracing::debug!(vm = %vm.id, %why, "report refused (the record changed meanwhile)");
            }
            Ok(other) => tracing::warn!(vm = %vm.id, ?other, "unexpected answer to a report"),
            Err(e) => {
                pass.errors += 1;
                tracing::warn!(vm = %vm.id, error = %e, "report not written; retrying next pass");
            }
        }
    }
}

/// A runtime observation as (state, reason, log path) for a report.
fn describe(o: &Observed) -> (VmState, String, String) {
    let log = o.log_path.display().to_string();
    match &o.state {
        RunState::Running => (VmState::Running, String::new(), log),
        RunState::Restarting { attempt } => (
            VmState::Running,
            format!("restarting after a failure (attempt {attempt})"),
            log,
        ),
        RunState::Stopped => (
            VmState::Stopped,
            o.exit_status
                .map(|s| format!("ended: {s}"))
                .unwrap_or_default(),
            log,
        ),
        RunState::Failed { reason } => (VmState::Failed, reason.clone(), log),
    }
}
