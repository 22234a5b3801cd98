//! VM runtimes: what actually runs a VM placed on this node.
//!
//! A node's reconciler compares the desired state of the VMs placed on it
//! with what its runtimes observe, and calls [`Runtime::start`] and
//! [`Runtime::stop`] until they agree. Two runtimes implement the trait:
//!
//! - [`ProcessRuntime`] (`runtime = "process"`): runs the spec's `command`
//!   as the VM's workload and supervises it. The default where QEMU is
//!   missing, and what the demo uses.
//! - [`MicrovmRuntime`] (`runtime = "microvm"`): boots the spec's kernel in
//!   QEMU's `microvm` machine, controlled over QMP, with KVM when a probe
//!   shows it can boot a guest and TCG otherwise.
//!
//! # Layout
//!
//! - [`spec`]: validation of a [`VmSpec`], with errors naming the field.
//! - [`metadata`]: what a VM learns about itself (id, name, address,
//!   gateway, MAC): environment and a file for a process workload, the
//!   kernel command line for a microVM guest.
//! - [`network`]: the node's VM bridge, TAP devices for microVMs and a
//!   network namespace with a veth pair for each process workload, made
//!   with `ip` and adopted again after a node restart.
//! - [`pidfile`]: pidfiles and `/proc` identities that survive a node
//!   restart, and signals to process groups.
//! - `supervisor` (private): the restart loop both runtimes share.
//! - [`process`]: the process runtime.
//! - [`qmp`]: a small QMP client over a unix socket.
//! - [`microvm`]: the QEMU `microvm` runtime, its KVM probe and its command
//!   line.
//!
//! # State directory and node restarts
//!
//! Each runtime owns a state directory with one subdirectory per VM id,
//! holding the workload's pidfile, the spec it was started with, its log
//! (workload output or serial console) and, for microVMs, the QMP socket.
//! The node persists nothing else of the runtime: a restarted node builds a
//! new runtime over the same directory and re-reconciles from the desired
//! state. A workload that outlived the node is found through its pidfile and
//! *adopted* (supervised again, never started a second time) either by
//! [`Runtime::recover`] or by the first [`Runtime::start`] of that VM.
//!
//! Dropping a runtime stops supervising but leaves its workloads running,
//! exactly as a node crash would; stop them first to end them.

pub mod metadata;
pub mod microvm;
pub mod network;
pub mod pidfile;
pub mod process;
pub mod qmp;
pub mod spec;
mod supervisor;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use tern_protocol::BoxFuture;
pub use tern_protocol::pb::VmSpec;

pub use microvm::{Accel, AccelChoice, MicrovmConfig, MicrovmRuntime};
pub use network::{Attachment, NetError, NetworkConfig, NodeNetwork};
pub use process::{ProcessRuntime, RunAs};
pub use spec::{RuntimeKind, SpecError, SpecField, validate};
pub use supervisor::{
    ADOPTED_POLL_INTERVAL, DEFAULT_INITIAL_BACKOFF, DEFAULT_MAX_BACKOFF, DEFAULT_MAX_RESTARTS,
    DEFAULT_STABLE_RUN, FORCE_EXIT_WAIT, KILL_WAIT, RestartPolicy, SPEC_FILE_NAME, STOP_STEP_BOUND,
};

/// The grace a reconciler gives a workload to stop on its own before it is
/// killed, when nothing more specific is configured: long enough for a
/// guest to run its shutdown scripts, short enough that a stuck VM does not
/// hold a migration for long.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);

/// The runtime for a VM whose spec leaves `runtime` empty: `microvm` where
/// QEMU ([`microvm::DEFAULT_QEMU`]) is installed, `process` otherwise. The
/// VM service fills the spec in with it before validating, so the choice
/// is recorded in the cluster state rather than made again on each node.
pub fn default_kind() -> RuntimeKind {
    if microvm::qemu_available(std::path::Path::new(microvm::DEFAULT_QEMU)) {
        RuntimeKind::Microvm
    } else {
        RuntimeKind::Process
    }
}

/// What a runtime observes of one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunState {
    /// The workload is running.
    Running,
    /// The workload failed and will be started again after a backoff.
    Restarting {
        /// How many consecutive failures led here (1 after the first).
        attempt: u32,
    },
    /// The workload is not running: it was stopped, or ended successfully.
    Stopped,
    /// The workload failed and will not be restarted.
    Failed {
        /// Why, in words an operator can act on.
        reason: String,
    },
}

impl RunState {
    /// Whether a workload process is (or is about to be) running.
    pub fn is_active(&self) -> bool {
        matches!(self, RunState::Running | RunState::Restarting { .. })
    }
}

/// How a workload process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
    /// It ended while adopted from an earlier node process, which alone
    /// could have collected its status.
    Unknown,
}

impl ExitStatus {
    fn from_std(status: std::process::ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(code), _) => ExitStatus::Code(code),
            (None, Some(signal)) => ExitStatus::Signal(signal),
            (None, None) => ExitStatus::Unknown,
        }
    }

    /// Whether this counts as a successful end (exit code 0).
    pub fn success(&self) -> bool {
        matches!(self, ExitStatus::Code(0))
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Code(code) => write!(f, "exit code {code}"),
            ExitStatus::Signal(signal) => write!(f, "killed by signal {signal}"),
            ExitStatus::Unknown => f.write_str("exit status unknown (adopted workload)"),
        }
    }
}

/// A runtime's view of one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// Running, restarting, stopped or failed.
    pub state: RunState,
    /// How the most recent workload process ended, if one has.
    pub exit_status: Option<ExitStatus>,
    /// The workload's output (process) or serial console (microvm).
    pub log_path: PathBuf,
    /// How many times the supervisor restarted the workload since the last
    /// [`Runtime::start`].
    pub restarts: u32,
    /// The workload's pid while it runs (QEMU's pid for a microVM).
    pub pid: Option<u32>,
}

/// What [`Runtime::start`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Started {
    /// A new workload process was spawned.
    Spawned {
        /// Its pid.
        pid: u32,
    },
    /// A workload left running by an earlier node process was found through
    /// its pidfile and is supervised again; nothing new was started.
    Adopted {
        /// Its pid.
        pid: u32,
    },
    /// This runtime already runs the VM with the same spec; nothing changed.
    AlreadyRunning {
        /// Its pid, unless it is between restarts.
        pid: Option<u32>,
    },
}

/// What [`Runtime::recover`] found for one VM directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovered {
    /// A live workload, now supervised by this runtime.
    Adopted {
        /// The VM id.
        vm_id: String,
        /// Its pid.
        pid: u32,
    },
    /// A pidfile whose process has gone, removed.
    CleanedUp {
        /// The VM id.
        vm_id: String,
    },
}

/// Why a runtime operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The spec broke a validation rule.
    #[error(transparent)]
    InvalidSpec(#[from] SpecError),
    /// The VM id cannot name a state directory.
    #[error("invalid VM id {vm_id:?}: {reason}")]
    InvalidVmId {
        /// The id given.
        vm_id: String,
        /// Why it was rejected.
        reason: spec::VmIdError,
    },
    /// The spec asks for a different runtime than the one called.
    #[error("VM spec asks for runtime {wanted:?}, but this is the {this} runtime")]
    WrongRuntime {
        /// The runtime named in the spec.
        wanted: String,
        /// This runtime.
        this: RuntimeKind,
    },
    /// The VM runs with a different spec; stop it before starting the new one.
    #[error("VM {vm_id} is running with a different spec; stop it first")]
    SpecChanged {
        /// The VM id.
        vm_id: String,
    },
    /// This runtime knows nothing of the VM.
    #[error("unknown VM {vm_id}")]
    UnknownVm {
        /// The VM id.
        vm_id: String,
    },
    /// The workload could not be spawned.
    #[error("cannot start VM {vm_id}: {reason}")]
    Spawn {
        /// The VM id.
        vm_id: String,
        /// Why.
        reason: String,
    },
    /// Talking to QEMU's QMP monitor failed.
    #[error(transparent)]
    Qmp(#[from] qmp::QmpError),
    /// The VM's network devices could not be made or removed.
    #[error(transparent)]
    Network(#[from] NetError),
    /// A file in the state directory could not be used.
    #[error("runtime state {path:?}: {source}")]
    State {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// A VM runtime. Object-safe: a node holds `Box<dyn Runtime>` per kind.
///
/// # Contract
///
/// - `vm_id` is the cluster's id of the VM; it names the VM's state
///   directory, so it is checked with [`spec::check_vm_id`] first.
/// - [`start`](Runtime::start) validates the spec, then is idempotent: a VM
///   this runtime already runs with the same spec is left alone, and a
///   workload left running by an earlier node process (found through its
///   pidfile) is adopted, never started twice. A VM running with a
///   *different* spec is an error ([`RuntimeError::SpecChanged`]); the
///   caller stops it first.
/// - Once started, a workload is supervised: when it fails (a non-zero
///   exit, or a signal it was not sent by [`stop`](Runtime::stop)) it is
///   restarted after a capped exponential backoff, at most
///   [`RestartPolicy::max_restarts`] times in a row, then reported as
///   [`RunState::Failed`]. A successful exit (code 0) is
///   [`RunState::Stopped`] and is not restarted.
/// - [`stop`](Runtime::stop) asks the workload to end (SIGTERM to its
///   process group; ACPI power-down for a microVM), kills it when `grace`
///   has passed, and returns once it has gone. Stopping a VM that is known
///   but not running is not an error; a VM this runtime has never seen,
///   and whose state directory records no live workload, is
///   [`RuntimeError::UnknownVm`] (which a reconciler may treat as
///   stopped). The VM stays known, so its exit status can still be read.
///   A `start` that races a `stop` waits for the stop, then starts afresh.
/// - [`status`](Runtime::status) never blocks on the workload for longer
///   than a QMP timeout; an unknown VM is [`RuntimeError::UnknownVm`].
/// - [`recover`](Runtime::recover) is called once after the node starts:
///   it adopts every live workload recorded in the state directory and
///   removes stale pidfiles, so that [`list`](Runtime::list) shows what is
///   really running and the reconciler can stop what is no longer desired.
/// - [`remove`](Runtime::remove) stops the VM (with `grace`), removes its
///   network devices and deletes its state directory, log included; the
///   VM is then unknown.
pub trait Runtime: Send + Sync {
    /// Which runtime this is.
    fn kind(&self) -> RuntimeKind;

    /// Starts (or adopts, or leaves running) the VM `vm_id` with `spec`,
    /// without a network.
    fn start<'a>(
        &'a self,
        vm_id: &'a str,
        spec: &'a VmSpec,
    ) -> BoxFuture<'a, Result<Started, RuntimeError>> {
        self.start_attached(vm_id, spec, None)
    }

    /// Starts (or adopts, or leaves running) the VM `vm_id` with `spec`,
    /// on the node's bridge with `network` when given (and the runtime
    /// has a [`NodeNetwork`]). The attachment is recorded in the VM's
    /// directory, so restarts of the workload get it too; its devices are
    /// made, or adopted, before each spawn, and removed by
    /// [`remove`](Runtime::remove).
    fn start_attached<'a>(
        &'a self,
        vm_id: &'a str,
        spec: &'a VmSpec,
        network: Option<&'a Attachment>,
    ) -> BoxFuture<'a, Result<Started, RuntimeError>>;

    /// Stops the VM, killing it after `grace`; returns its final state.
    fn stop<'a>(
        &'a self,
        vm_id: &'a str,
        grace: Duration,
    ) -> BoxFuture<'a, Result<Observed, RuntimeError>>;

    /// What the runtime observes of the VM now.
    fn status<'a>(&'a self, vm_id: &'a str) -> BoxFuture<'a, Result<Observed, RuntimeError>>;

    /// Every VM this runtime knows, sorted by id.
    fn list(&self) -> BoxFuture<'_, Vec<(String, Observed)>>;

    /// Adopts live workloads and cleans up stale pidfiles left by an earlier
    /// node process.
    fn recover(&self) -> BoxFuture<'_, Result<Vec<Recovered>, RuntimeError>>;

    /// Stops the VM and deletes its state directory.
    fn remove<'a>(
        &'a self,
        vm_id: &'a str,
        grace: Duration,
    ) -> BoxFuture<'a, Result<(), RuntimeError>>;
}
