//! The `microvm` runtime: each VM is a QEMU process running the `microvm`
//! machine type (`qemu-system-x86_64 -M microvm`), controlled over QMP.
//!
//! Per VM, the state directory holds `qmp.sock` (the QMP server QEMU
//! listens on), `serial.log` (the guest's serial console, `ttyS0`,
//! appended across restarts), `qemu.log` (QEMU's own stdout and stderr),
//! the pidfile, the spec, the network attachment and the config drive
//! (`config-drive.tar`, rewritten at each start). A VM started with an
//! attachment (and a runtime with a [`NodeNetwork`]) gets a virtio-net
//! device on its own TAP device on the node's bridge, with its MAC;
//! otherwise the guest has no network (`-nic none`). The guest's identity
//! and address are on its kernel command line and on a read-only config
//! drive ([`crate::metadata`]).
//!
//! # Acceleration
//!
//! KVM is used only when it can actually boot a guest: a `/dev/kvm` that
//! opens, and even a QEMU that starts with `accel=kvm`, prove little (on
//! nested or sandboxed hosts QEMU starts and the guest then hangs in its
//! first instructions after real mode). So with [`AccelChoice::Auto`] the
//! first start *probes*: it boots the VM's own kernel under KVM with
//! `earlyprintk=ttyS0` and waits up to [`KVM_PROBE_TIMEOUT`] for the
//! kernel's first log line ([`KVM_PROBE_MARKER`]); if it never comes, the
//! runtime uses TCG. The result is kept for the runtime's lifetime.
//!
//! # Guest command line
//!
//! `console=ttyS0` is added unless the spec names a console. Under TCG,
//! `tsc_early_khz=<host kHz>` (from `/proc/cpuinfo`'s `cpu MHz`) is added
//! unless given: without it a Linux guest may hang calibrating its TSC
//! against a timer that TCG emulates too slowly.
//!
//! # Stopping
//!
//! A stop presses the ACPI power button (`system_powerdown`) and waits the
//! grace for the guest to power off; then sends `quit`; then SIGKILL. A
//! guest without an ACPI power button handler (a bare busybox init, say)
//! ignores the button and is ended by `quit`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tern_protocol::BoxFuture;
use tokio::process::Command;
use tokio::sync::OnceCell;

use crate::metadata;
use crate::network::{Attachment, NodeNetwork, recorded_attachment};
use crate::pidfile::ProcessIdentity;
use crate::qmp::{QmpClient, QmpError, RunStatus};
use crate::spec::{self, RuntimeKind, SpecError, SpecField};
use crate::supervisor::{RestartPolicy, Supervisor, Workload, last_line};
use crate::{Observed, Recovered, RunState, Runtime, RuntimeError, Started, VmSpec};
use tern_state::network::format_mac;

/// The QEMU binary used unless configured otherwise (looked up in `PATH`).
pub const DEFAULT_QEMU: &str = "qemu-system-x86_64";

/// Name of the QMP socket in a VM's state directory.
pub const QMP_SOCKET_NAME: &str = "qmp.sock";

/// Name of the serial console log in a VM's state directory.
pub const SERIAL_LOG_NAME: &str = "serial.log";

/// Name of QEMU's own output log in a VM's state directory.
pub const QEMU_LOG_NAME: &str = "qemu.log";

/// Longest unix socket path: `sun_path` is 108 bytes on Linux, one of them
/// the terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;

/// How long the KVM probe waits for the guest kernel's first log line. A
/// kernel under working KVM prints it within a fraction of a second (under
/// TCG on these machines, about half a second); ten seconds leaves room for
/// a loaded host without delaying the first start much where KVM is broken.
pub const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// The line a Linux kernel prints first (with `earlyprintk`): seeing it on
/// the serial console proves the guest ran through real, protected and
/// long mode into the kernel proper.
pub const KVM_PROBE_MARKER: &str = "Linux version";

/// Guest memory for the KVM probe: enough for a distribution kernel to
/// decompress itself (64 MiB is not, for Debian's cloud kernel).
pub const KVM_PROBE_MEMORY_MIB: u64 = 256;

/// How often the KVM probe and the QMP readiness wait poll.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// How long [`MicrovmRuntime`]'s `start` waits for a new QEMU's QMP socket
/// to answer before returning: QEMU opens it before the guest runs, in
/// well under a second.
pub const QMP_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The accelerator a microVM runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation through `/dev/kvm`.
    Kvm,
    /// QEMU's software emulator.
    Tcg,
}

impl Accel {
    fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// How the runtime chooses its accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccelChoice {
    /// Probe KVM on the first start; TCG if it cannot boot a guest.
    #[default]
    Auto,
    /// Always KVM (no probe).
    Kvm,
    /// Always TCG (no probe).
    Tcg,
}

/// Configuration of a [`MicrovmRuntime`].
#[derive(Debug, Clone)]
pub struct MicrovmConfig {
    /// The QEMU binary: a path, or a name looked up in `PATH`.
    pub qemu: PathBuf,
    /// How to choose the accelerator.
    pub accel: AccelChoice,
    /// When to restart a QEMU that failed.
    pub restart: RestartPolicy,
    /// Directories the kernel, initrd and image must lie in (after
    /// resolving symlinks); `None` allows any readable file (for tests and
    /// tools; a node always sets it).
    pub allowed_dirs: Option<Vec<PathBuf>>,
    /// The node's guest network, for VMs started with an attachment.
    pub network: Option<Arc<NodeNetwork>>,
}

impl Default for MicrovmConfig {
    fn default() -> Self {
        MicrovmConfig {
            qemu: PathBuf::from(DEFAULT_QEMU),
            accel: AccelChoice::Auto,
            restart: RestartPolicy::default(),
            allowed_dirs: None,
            network: None,
        }
    }
}

/// The `microvm` runtime.
pub struct MicrovmRuntime {
    supervisor: Supervisor<MicrovmWorkload>,
}

impl MicrovmRuntime {
    /// A microVM runtime keeping its state under `state_dir`, with the
    /// default configuration.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        MicrovmRuntime::with_config(state_dir, MicrovmConfig::default())
    }

    /// A microVM runtime with `config`.
    pub fn with_config(state_dir: impl Into<PathBuf>, config: MicrovmConfig) -> Self {
        let root = state_dir.into();
        let workload = MicrovmWorkload {
            qemu: config.qemu,
            choice: config.accel,
            accel: OnceCell::new(),
            probe_dir: root.join(".kvm-probe"),
            allowed_dirs: config.allowed_dirs,
            network: config.network,
        };
        MicrovmRuntime {
            supervisor: Supervisor::new(root, workload, config.restart),
        }
    }

    /// The accelerator in use, once the first start has chosen it.
    pub fn accel(&self) -> Option<Accel> {
        self.supervisor.workload().accel.get().copied()
    }

    /// The VM's QMP socket.
    pub fn qmp_socket(&self, vm_id: &str) -> Result<PathBuf, RuntimeError> {
        Ok(self.supervisor.vm_dir(vm_id)?.join(QMP_SOCKET_NAME))
    }

    /// Asks the VM's QEMU for its run state (`query-status`).
    pub async fn query_status(&self, vm_id: &str) -> Result<RunStatus, RuntimeError> {
        let mut qmp = QmpClient::connect(&self.qmp_socket(vm_id)?).await?;
        Ok(qmp.query_status().await?)
    }

    /// Waits until the VM's QMP socket answers, or the VM is no longer
    /// running, or [`QMP_READY_TIMEOUT`] passes.
    async fn wait_qmp_ready(&self, vm_id: &str) -> Result<(), RuntimeError> {
        let socket = self.qmp_socket(vm_id)?;
        let wait = async {
            loop {
                match QmpClient::connect(&socket).await {
                    Ok(_) => return Ok(()),
                    Err(e) => {
                        let observed = self.supervisor.status(vm_id).await?;
                        if observed.state != RunState::Running {
                            return Err(RuntimeError::Qmp(e));
                        }
                    }
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        };
        match tokio::time::timeout(QMP_READY_TIMEOUT, wait).await {
            Ok(result) => result,
            Err(_) => Err(RuntimeError::Qmp(QmpError::Timeout {
                what: format!("readiness of {socket:?}"),
            })),
        }
    }
}

/// Whether `qemu` (a path, or a name looked up in `PATH`) is an existing
/// file; lets a node fall back to the process runtime where QEMU is
/// missing.
pub fn qemu_available(qemu: &Path) -> bool {
    if qemu.components().count() > 1 {
        return qemu.is_file();
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(qemu).is_file()))
        .unwrap_or(false)
}

/// The host's TSC frequency in kHz, from the first `cpu MHz` line of
/// `/proc/cpuinfo`.
pub fn host_tsc_khz() -> Option<u64> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    parse_cpu_mhz_khz(&cpuinfo)
}

fn parse_cpu_mhz_khz(cpuinfo: &str) -> Option<u64> {
    let line = cpuinfo.lines().find(|l| l.starts_with("cpu MHz"))?;
    let mhz: f64 = line.split(':').nth(1)?.trim().parse().ok()?;
    if !(mhz.is_finite() && mhz > 0.0) {
        return None;
    }
    // Rounded to whole kHz, which is what the kernel parameter takes.
    Some((mhz * 1000.0).round() as u64)
}

/// The guest kernel command line for `spec` under `accel`.
pub fn guest_cmdline(spec_cmdline: &str, accel: Accel, tsc_khz: Option<u64>) -> String {
    let mut parts: Vec<String> = Vec::new();
    let has = |key: &str| spec_cmdline.split_whitespace().any(|w| w.starts_with(key));
    if !has("console=") {
        parts.push("console=ttyS0".into());
    }
    if accel == Accel::Tcg
        && !has("tsc_early_khz=")
        && let Some(khz) = tsc_khz
    {
        parts.push(format!("tsc_early_khz={khz}"));
    }
    if !spec_cmdline.trim().is_empty() {
        parts.push(spec_cmdline.trim().to_owned());
    }
    parts.join(" ")
}

struct MicrovmWorkload {
    qemu: PathBuf,
    choice: AccelChoice,
    accel: OnceCell<Accel>,
    probe_dir: PathBuf,
    allowed_dirs: Option<Vec<PathBuf>>,
    network: Option<Arc<NodeNetwork>>,
}

impl MicrovmWorkload {
    /// QEMU's network arguments for `vm_id`, its TAP made (or adopted)
    /// now: a virtio-net device on the TAP with the VM's MAC, or no NIC;
    /// and the attachment when there is a device.
    async fn nic_args(
        &self,
        vm_id: &str,
        vm_dir: &Path,
    ) -> Result<(Vec<String>, Option<Attachment>), RuntimeError> {
        let attachment = recorded_attachment(vm_dir).map_err(|reason| RuntimeError::Spawn {
            vm_id: vm_id.to_owned(),
            reason: format!("its network attachment: {reason}"),
        })?;
        let (Some(network), Some(a)) = (&self.network, attachment) else {
            return Ok((vec!["-nic".into(), "none".into()], None));
        };
        let tap = network.attach_tap(vm_id, &a).await?;
        let args = vec![
            "-netdev".into(),
            format!("tap,id=net0,ifname={tap},script=no,downscript=no"),
            "-device".into(),
            format!("virtio-net-device,netdev=net0,mac={}", format_mac(&a.mac)),
        ];
        Ok((args, Some(a)))
    }

    /// QEMU, run in the network's host namespace when it names one (the
    /// TAP is there).
    fn qemu_command(&self) -> Command {
        match self
            .network
            .as_ref()
            .and_then(|n| n.config().host_netns.clone())
        {
            Some(ns) => {
                let mut command = Command::new("nsenter");
                command
                    .arg(format!("--net={}", NodeNetwork::netns_path(&ns).display()))
                    .arg("--")
                    .arg(&self.qemu);
                command
            }
            None => Command::new(&self.qemu),
        }
    }

    /// The kernel, initrd and image must lie in the allowed directories.
    fn check_paths(&self, spec: &VmSpec) -> Result<(), SpecError> {
        let Some(allowed) = &self.allowed_dirs else {
            return Ok(());
        };
        spec::require_allowed(SpecField::Kernel, &spec.kernel, allowed)?;
        if !spec.initrd.is_empty() {
            spec::require_allowed(SpecField::Initrd, &spec.initrd, allowed)?;
        }
        if !spec.image.is_empty() {
            spec::require_allowed(SpecField::Image, &spec.image, allowed)?;
        }
        Ok(())
    }

    async fn accel_for(&self, kernel: &str) -> Accel {
        *self
            .accel
            .get_or_init(|| async {
                let accel = match self.choice {
                    AccelChoice::Kvm => Accel::Kvm,
                    AccelChoice::Tcg => Accel::Tcg,
                    AccelChoice::Auto => {
                        match probe_kvm(&self.qemu, Path::new(kernel), &self.probe_dir).await {
                            Ok(()) => Accel::Kvm,
                            Err(why) => {
                                tracing::info!(
                                    reason = %why,
                                    "KVM cannot boot a guest here; using TCG"
                                );
                                Accel::Tcg
                            }
                        }
                    }
                };
                tracing::info!(accel = accel.as_str(), "microVM accelerator chosen");
                accel
            })
            .await
    }
}

/// Why KVM cannot boot a guest here (the node then uses TCG, and logs
/// this).
#[derive(Debug, thiserror::Error)]
enum KvmProbeError {
    /// `/dev/kvm` cannot be opened.
    #[error("cannot open /dev/kvm: {0}")]
    Device(#[source] std::io::Error),
    /// The probe's directory cannot be created.
    #[error("cannot create {}: {source}", dir.display())]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// QEMU could not be started.
    #[error("cannot run {}: {source}", qemu.display())]
    Qemu {
        /// The QEMU binary.
        qemu: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// QEMU exited before the guest printed.
    #[error("QEMU with accel=kvm exited ({0}) before the guest printed")]
    Exited(std::process::ExitStatus),
    /// The guest printed nothing in time.
    #[error("the guest printed nothing under KVM within {} s", KVM_PROBE_TIMEOUT.as_secs())]
    Silent,
}

/// Boots `kernel` under KVM until its first log line; `Err(why)` if KVM is
/// unusable.
async fn probe_kvm(qemu: &Path, kernel: &Path, dir: &Path) -> Result<(), KvmProbeError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(KvmProbeError::Device)?;
    std::fs::create_dir_all(dir).map_err(|source| KvmProbeError::Dir {
        dir: dir.to_owned(),
        source,
    })?;
    let log = dir.join(SERIAL_LOG_NAME);
    let _ = std::fs::remove_file(&log);
    let mut child = Command::new(qemu)
        .args(["-M", "microvm,accel=kvm", "-m"])
        .arg(KVM_PROBE_MEMORY_MIB.to_string())
        .args([
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-nic",
            "none",
            "-no-reboot",
            "-serial",
        ])
        .arg(format!("file:{}", log.display()))
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", "console=ttyS0 earlyprintk=ttyS0 panic=-1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| KvmProbeError::Qemu {
            qemu: qemu.to_owned(),
            source,
        })?;
    let outcome = tokio::time::timeout(KVM_PROBE_TIMEOUT, async {
        loop {
            if std::fs::read(&log)
                .map(|bytes| String::from_utf8_lossy(&bytes).contains(KVM_PROBE_MARKER))
                .unwrap_or(false)
            {
                return Ok(());
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(KvmProbeError::Exited(status));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    })
    .await
    .unwrap_or(Err(KvmProbeError::Silent));
    if let Some(pid) = child.id()
        && let Some(identity) = ProcessIdentity::of_pid(pid)
    {
        let _ = identity.signal_group(rustix::process::Signal::KILL);
    }
    let _ = child.kill().await;
    outcome
}

impl Workload for MicrovmWorkload {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Microvm
    }

    fn log_path(&self, vm_dir: &Path) -> PathBuf {
        vm_dir.join(SERIAL_LOG_NAME)
    }

    fn command<'a>(
        &'a self,
        vm_id: &'a str,
        vm_dir: &'a Path,
        spec: &'a VmSpec,
    ) -> BoxFuture<'a, Result<Command, RuntimeError>> {
        Box::pin(async move {
            self.check_paths(spec)?;
            let socket = vm_dir.join(QMP_SOCKET_NAME);
            if socket.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(RuntimeError::Spawn {
                    vm_id: vm_id.to_owned(),
                    reason: format!(
                        "QMP socket path {socket:?} is longer than {MAX_SOCKET_PATH} bytes; \
                         use a shorter state directory"
                    ),
                });
            }
            if !qemu_available(&self.qemu) {
                return Err(RuntimeError::Spawn {
                    vm_id: vm_id.to_owned(),
                    reason: format!("QEMU ({:?}) is not installed", self.qemu),
                });
            }
            // A socket left by an earlier QEMU would make the new one fail
            // to listen.
            let _ = std::fs::remove_file(&socket);
            let accel = self.accel_for(&spec.kernel).await;
            let serial = vm_dir.join(SERIAL_LOG_NAME);
            let qemu_log_path = vm_dir.join(QEMU_LOG_NAME);
            let state = |source| RuntimeError::State {
                path: qemu_log_path.clone(),
                source,
            };
            let qemu_log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&qemu_log_path)
                .map_err(state)?;
            let qemu_err = qemu_log.try_clone().map_err(state)?;
            let (nic, attached) = self.nic_args(vm_id, vm_dir).await?;
            let identity = metadata::items(vm_id, &spec.name, attached.as_ref());
            let drive = vm_dir.join(metadata::CONFIG_DRIVE_FILE_NAME);
            std::fs::write(&drive, metadata::config_drive(&identity, &spec.user_data)).map_err(
                |source| RuntimeError::State {
                    path: drive.clone(),
                    source,
                },
            )?;

            let mut command = self.qemu_command();
            command
                .arg("-name")
                .arg(vm_id)
                .arg("-M")
                .arg(format!("microvm,accel={}", accel.as_str()))
                .arg("-m")
                .arg(spec.memory_mib.to_string())
                .arg("-smp")
                .arg(spec.vcpus.to_string())
                .args(["-nodefaults", "-no-user-config", "-display", "none"])
                .args(nic)
                .arg("-chardev")
                .arg(format!(
                    "file,id=console,path={},append=on",
                    qemu_opt_escape(&serial)
                ))
                .args(["-serial", "chardev:console"])
                .arg("-qmp")
                .arg(format!(
                    "unix:{},server=on,wait=off",
                    qemu_opt_escape(&socket)
                ))
                .arg("-kernel")
                .arg(&spec.kernel);
            if !spec.initrd.is_empty() {
                command.arg("-initrd").arg(&spec.initrd);
            }
            if !spec.image.is_empty() {
                command
                    .arg("-drive")
                    .arg(format!(
                        "id=root,file={},format=raw,if=none",
                        qemu_opt_escape(Path::new(&spec.image))
                    ))
                    .args(["-device", "virtio-blk-device,drive=root"]);
            }
            // The config drive, last, found by its serial.
            command
                .arg("-drive")
                .arg(format!(
                    "id=config,file={},format=raw,if=none,readonly=on",
                    qemu_opt_escape(&drive)
                ))
                .arg("-device")
                .arg(format!(
                    "virtio-blk-device,drive=config,serial={}",
                    metadata::CONFIG_DRIVE_SERIAL
                ));
            command
                .arg("-append")
                .arg(format!(
                    "{} {}",
                    guest_cmdline(&spec.kernel_cmdline, accel, host_tsc_khz()),
                    metadata::cmdline(&identity, &spec.user_data)
                ))
                .current_dir(vm_dir)
                .stdin(Stdio::null())
                .stdout(qemu_log)
                .stderr(qemu_err);
            Ok(command)
        })
    }

    fn prepare<'a>(&'a self, spec: &'a VmSpec) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            // A kernel outside the allowed directories is never booted, not
            // even by the KVM probe; the start then fails naming it.
            if self.check_paths(spec).is_ok() {
                self.accel_for(&spec.kernel).await;
            }
        })
    }

    fn failure_detail(&self, vm_dir: &Path) -> Option<String> {
        last_line(&vm_dir.join(QEMU_LOG_NAME)).map(|line| format!("QEMU said: {line}"))
    }

    fn request_stop<'a>(
        &'a self,
        vm_dir: &'a Path,
        _process: ProcessIdentity,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let socket = vm_dir.join(QMP_SOCKET_NAME);
            let result = async {
                let mut qmp = QmpClient::connect(&socket).await?;
                qmp.system_powerdown().await
            }
            .await;
            if let Err(e) = result {
                tracing::warn!(error = %e, "system_powerdown failed");
            }
        })
    }

    fn before_kill<'a>(
        &'a self,
        vm_dir: &'a Path,
        _process: ProcessIdentity,
    ) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            let socket = vm_dir.join(QMP_SOCKET_NAME);
            let result = async { QmpClient::connect(&socket).await?.quit().await }.await;
            match result {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "QMP quit failed");
                    false
                }
            }
        })
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

/// Escapes a path for a QEMU option value, where `,` is doubled.
fn qemu_opt_escape(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

impl Runtime for MicrovmRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Microvm
    }

    fn start_attached<'a>(
        &'a self,
        vm_id: &'a str,
        spec: &'a VmSpec,
        network: Option<&'a Attachment>,
    ) -> BoxFuture<'a, Result<Started, RuntimeError>> {
        Box::pin(async move {
            let started = self.supervisor.start(vm_id, spec, network).await?;
            if let Started::Spawned { .. } = started
                && let Err(e) = self.wait_qmp_ready(vm_id).await
            {
                tracing::warn!(vm_id, error = %e, "QEMU's QMP socket is not answering yet");
            }
            Ok(started)
        })
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

    #[test]
    fn cpu_mhz_becomes_khz() {
        let cpuinfo = "processor\t: 0\nmodel name\t: X\ncpu MHz\t\t: 2596.120\ncpu MHz\t\t: 1.0\n";
        assert_eq!(parse_cpu_mhz_khz(cpuinfo), Some(2_596_120));
        assert_eq!(parse_cpu_mhz_khz("processor : 0\n"), None);
    }

    #[test]
    fn cmdline_gets_console_and_tsc_under_tcg_only() {
        assert_eq!(
            guest_cmdline("quiet", Accel::Tcg, Some(2_596_120)),
            "console=ttyS0 tsc_early_khz=2596120 quiet"
        );
        assert_eq!(guest_cmdline("", Accel::Kvm, Some(1)), "console=ttyS0");
        assert_eq!(
            guest_cmdline("console=hvc0 tsc_early_khz=5", Accel::Tcg, Some(1)),
            "console=hvc0 tsc_early_khz=5"
        );
    }

    #[test]
    fn commas_in_option_paths_are_doubled() {
        assert_eq!(qemu_opt_escape(Path::new("/a,b/c")), "/a,,b/c");
    }
}
