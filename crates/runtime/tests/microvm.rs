//! A real boot under the `microvm` runtime: QEMU's `microvm` machine, a
//! Debian cloud kernel and a busybox initramfs (see
//! `support/microvm_assets.rs` for how they are obtained).
//!
//! The test fails, never skips, when the assets cannot be prepared: a node
//! that claims to run microVMs must be able to.

mod support;

use std::time::{Duration, Instant};

use rustix::process::Signal;
use support::microvm_assets::{self, BOOT_MARKER, POWER_OFF_MARKER};
use support::wait_for;
use tern_runtime::pidfile::KillOnDrop;
use tern_runtime::pidfile::ProcessIdentity;
use tern_runtime::{
    ExitStatus, MicrovmRuntime, RunState, Runtime, RuntimeError, Started, VmSpec, pidfile,
};

/// Bound on preparing the assets: installing QEMU from Debian packages on a
/// fresh machine downloads tens of megabytes.
const SETUP_BOUND: Duration = Duration::from_secs(900);

/// Bound on the guest reaching userspace. Under TCG on these machines the
/// kernel reaches `/init` in a few seconds; the KVM probe may take up to
/// its own timeout first.
const BOOT_BOUND: Duration = Duration::from_secs(120);

/// Bound on the rest of the test (QMP calls and the stop).
const STOP_BOUND: Duration = Duration::from_secs(60);

/// Grace for the ACPI power button: the guest's `/init` powers off as soon
/// as the button is pressed, in well under a second.
const GRACE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boots_a_real_guest_and_stops_it() {
    let cache = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("microvm-assets");
    let setup = tokio::task::spawn_blocking(move || microvm_assets::prepare(&cache));
    let assets = match tokio::time::timeout(SETUP_BOUND, setup).await {
        Ok(Ok(Ok(assets))) => assets,
        Ok(Ok(Err(why))) => panic!("microVM test setup failed: {why}"),
        Ok(Err(join)) => panic!("microVM test setup panicked: {join}"),
        Err(_) => panic!("microVM test setup took longer than {SETUP_BOUND:?}"),
    };

    // A short state dir: the QMP socket path must fit in 107 bytes.
    let dir = tempfile::Builder::new()
        .prefix("tern-mvm")
        .tempdir_in("/tmp")
        .unwrap();
    let _guard = KillOnDrop::new(dir.path());
    let rt = MicrovmRuntime::new(dir.path());
    let spec = VmSpec {
        name: "guest".into(),
        vcpus: 1,
        memory_mib: 256,
        runtime: "microvm".into(),
        kernel: assets.kernel.display().to_string(),
        initrd: assets.initrd.display().to_string(),
        kernel_cmdline: "panic=-1".into(),
        ..VmSpec::default()
    };

    let began = Instant::now();
    let started = tokio::time::timeout(BOOT_BOUND, rt.start("mvm-1", &spec))
        .await
        .expect("start exceeded the boot bound")
        .unwrap();
    let Started::Spawned { pid } = started else {
        panic!("expected a spawn, got {started:?}");
    };
    let accel = rt
        .accel()
        .expect("the accelerator is chosen on first start");
    let spawned_after = began.elapsed();
    let serial = rt.status("mvm-1").await.unwrap().log_path;

    let booted = tokio::time::timeout(BOOT_BOUND, async {
        loop {
            let text = tokio::fs::read_to_string(&serial).await.unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.contains(BOOT_MARKER)) {
                return line.to_owned();
            }
            let observed = rt.status("mvm-1").await.unwrap();
            assert!(
                observed.state == RunState::Running,
                "QEMU is no longer running ({observed:?}); serial log:\n{text}\nqemu.log:\n{}",
                std::fs::read_to_string(dir.path().join("mvm-1/qemu.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let marker = booted.unwrap_or_else(|_| {
        panic!(
            "the guest did not print {BOOT_MARKER} within {BOOT_BOUND:?}; serial log:\n{}",
            std::fs::read_to_string(&serial).unwrap_or_default()
        )
    });
    eprintln!(
        "guest booted under {accel:?}: QEMU spawned after {spawned_after:?} \
         (includes any KVM probe), marker after {:?}: {marker}",
        began.elapsed()
    );

    let new_pid = tokio::time::timeout(BOOT_BOUND, async {
        let qmp = rt.query_status("mvm-1").await.unwrap();
        assert!(qmp.running, "query-status: {qmp:?}");
        assert_eq!(qmp.status, "running");
        assert_eq!(
            rt.start("mvm-1", &spec).await.unwrap(),
            Started::AlreadyRunning { pid: Some(pid) }
        );
        assert_eq!(pidfile::live_workloads(dir.path()).len(), 1);

        // QEMU dies under the guest: the supervisor starts it again and
        // the guest boots a second time (the serial log is appended).
        ProcessIdentity::of_pid(pid)
            .expect("QEMU runs")
            .signal(Signal::KILL)
            .unwrap();
        let restarted = wait_for(BOOT_BOUND, "QEMU to be restarted", || async {
            let o = rt.status("mvm-1").await.unwrap();
            (o.restarts == 1 && o.state == RunState::Running).then_some(o)
        })
        .await;
        assert_eq!(restarted.exit_status, Some(ExitStatus::Signal(9)));
        let new_pid = restarted.pid.expect("restarted QEMU has a pid");
        assert_ne!(new_pid, pid);
        wait_for(BOOT_BOUND, "the guest to boot again", || async {
            let text = tokio::fs::read_to_string(&serial).await.ok()?;
            (text.matches(BOOT_MARKER).count() == 2).then_some(())
        })
        .await;
        let qmp = rt.query_status("mvm-1").await.unwrap();
        assert!(qmp.running, "query-status after restart: {qmp:?}");
        new_pid
    })
    .await
    .expect("the restart exceeded its bound");

    // The node restarts: a new runtime over the same state dir adopts the
    // running QEMU instead of booting a second one (and needs no KVM probe).
    drop(rt);
    let rt = MicrovmRuntime::new(dir.path());
    tokio::time::timeout(STOP_BOUND, async {
        assert_eq!(
            rt.start("mvm-1", &spec).await.unwrap(),
            Started::Adopted { pid: new_pid }
        );
        assert_eq!(rt.accel(), None, "adoption probes nothing");
        assert_eq!(pidfile::live_workloads(dir.path()).len(), 1);
        let qmp = rt.query_status("mvm-1").await.unwrap();
        assert!(qmp.running, "query-status after adoption: {qmp:?}");

        // Stop: the ACPI power button, which the guest honours by powering
        // off; QEMU then exits on its own. (Its exit status went to the
        // earlier runtime, QEMU's parent.)
        let stopped = rt.stop("mvm-1", GRACE).await.unwrap();
        assert_eq!(stopped.state, RunState::Stopped, "{stopped:?}");
        assert_eq!(
            stopped.exit_status,
            Some(ExitStatus::Unknown),
            "{stopped:?}"
        );
        let console = std::fs::read_to_string(&serial).unwrap();
        assert!(
            console.contains(POWER_OFF_MARKER) && console.contains("reboot: Power down"),
            "the guest powered itself off on system_powerdown; serial log:\n{console}"
        );
        assert_eq!(
            console.matches(BOOT_MARKER).count(),
            2,
            "adoption booted nothing"
        );
        assert!(pidfile::live_workloads(dir.path()).is_empty());
        wait_for(Duration::from_secs(10), "QEMU to exit", || async {
            ProcessIdentity::of_pid(new_pid).is_none().then_some(())
        })
        .await;
        assert!(matches!(
            rt.query_status("mvm-1").await,
            Err(RuntimeError::Qmp(_))
        ));
    })
    .await
    .expect("stopping exceeded its bound");
}
