//! The `process` runtime against real processes: start, status, stop (and
//! its SIGKILL escalation), the restart policy, adoption after a simulated
//! node restart, and spec validation.
//!
//! Every test runs under a [`TEST_BOUND`] timeout and a guard that kills
//! whatever its runtime started, pass or fail.

mod support;

use std::path::Path;
use std::time::Duration;

use support::wait_for;
use tern_runtime::pidfile::KillOnDrop;
use tern_runtime::pidfile::{self, ProcessIdentity};
use tern_runtime::{
    ExitStatus, ProcessRuntime, Recovered, RestartPolicy, RunState, Runtime, RuntimeError,
    SpecField, Started, VmSpec,
};

/// Upper bound on any one test; far above what each needs.
const TEST_BOUND: Duration = Duration::from_secs(60);

/// Bound on waiting for a workload to reach a state.
const WAIT: Duration = Duration::from_secs(20);

/// Grace given on stop in tests where the workload honours SIGTERM.
const GRACE: Duration = Duration::from_secs(5);

fn spec(name: &str, script: &str) -> VmSpec {
    VmSpec {
        name: name.into(),
        vcpus: 1,
        memory_mib: 64,
        runtime: "process".into(),
        command: vec!["/bin/sh".into(), "-c".into(), script.into()],
        ..VmSpec::default()
    }
}

async fn bounded<F: std::future::Future<Output = ()>>(test: F) {
    tokio::time::timeout(TEST_BOUND, test)
        .await
        .expect("test exceeded its bound");
}

async fn log_contains(path: &Path, needle: &str) -> Option<()> {
    let text = tokio::fs::read_to_string(path).await.ok()?;
    text.contains(needle).then_some(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_status_stop() {
    let dir = tempfile::tempdir().unwrap();
    let _guard = KillOnDrop::new(dir.path());
    bounded(async {
        let rt: Box<dyn Runtime> = Box::new(ProcessRuntime::new(dir.path()));
        let spec = spec("web", "echo hello from the workload; exec sleep 600");
        let Started::Spawned { pid } = rt.start("vm-1", &spec).await.unwrap() else {
            panic!("expected a spawn");
        };
        assert_eq!(
            rt.start("vm-1", &spec).await.unwrap(),
            Started::AlreadyRunning { pid: Some(pid) },
            "a second start of the same spec changes nothing"
        );
        let observed = rt.status("vm-1").await.unwrap();
        assert_eq!(observed.state, RunState::Running);
        assert_eq!(observed.pid, Some(pid));
        assert_eq!(observed.restarts, 0);
        assert_eq!(observed.log_path, dir.path().join("vm-1/workload.log"));
        wait_for(WAIT, "the workload's output in its log", || {
            log_contains(&observed.log_path, "hello from the workload")
        })
        .await;
        assert_eq!(pidfile::live_workloads(dir.path()).len(), 1);
        let other = spec.clone();
        assert!(matches!(
            rt.start("vm-1", &VmSpec { vcpus: 2, ..other }).await,
            Err(RuntimeError::SpecChanged { .. })
        ));

        let stopped = rt.stop("vm-1", GRACE).await.unwrap();
        assert_eq!(stopped.state, RunState::Stopped);
        assert_eq!(
            stopped.exit_status,
            Some(ExitStatus::Signal(15)),
            "ended by SIGTERM"
        );
        assert_eq!(stopped.pid, None);
        assert!(
            ProcessIdentity::of_pid(pid).is_none(),
            "the process is gone"
        );
        assert!(pidfile::live_workloads(dir.path()).is_empty());
        assert_eq!(rt.list().await.len(), 1, "a stopped VM stays known");

        // Stopping again is harmless; starting again spawns a new process.
        assert_eq!(
            rt.stop("vm-1", GRACE).await.unwrap().state,
            RunState::Stopped
        );
        assert!(matches!(
            rt.start("vm-1", &spec).await.unwrap(),
            Started::Spawned { .. }
        ));
        rt.remove("vm-1", GRACE).await.unwrap();
        assert!(
            !dir.path().join("vm-1").exists(),
            "remove deletes the VM's state"
        );
        assert!(matches!(
            rt.status("vm-1").await,
            Err(RuntimeError::UnknownVm { .. })
        ));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_kills_a_workload_that_ignores_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let _guard = KillOnDrop::new(dir.path());
    bounded(async {
        let rt = ProcessRuntime::new(dir.path());
        let spec = spec(
            "stubborn",
            "trap '' TERM; echo ready; while :; do sleep 0.1; done",
        );
        rt.start("vm-2", &spec).await.unwrap();
        let log = rt.status("vm-2").await.unwrap().log_path;
        wait_for(WAIT, "the SIGTERM trap to be set", || {
            log_contains(&log, "ready")
        })
        .await;
        let stopped = rt.stop("vm-2", Duration::from_millis(300)).await.unwrap();
        assert_eq!(stopped.state, RunState::Stopped);
        assert_eq!(
            stopped.exit_status,
            Some(ExitStatus::Signal(9)),
            "ended by SIGKILL"
        );
        assert!(pidfile::live_workloads(dir.path()).is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_workload_is_restarted_then_failed() {
    let dir = tempfile::tempdir().unwrap();
    let _guard = KillOnDrop::new(dir.path());
    bounded(async {
        let policy = RestartPolicy {
            max_restarts: 3,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(40),
            stable_run: Duration::from_secs(60),
        };
        let rt = ProcessRuntime::with_policy(dir.path(), policy);
        rt.start("vm-3", &spec("crashy", "echo run; exit 1"))
            .await
            .unwrap();
        let observed = wait_for(WAIT, "the VM to be given up on", || async {
            let o = rt.status("vm-3").await.unwrap();
            matches!(o.state, RunState::Failed { .. }).then_some(o)
        })
        .await;
        assert_eq!(observed.restarts, 3);
        assert_eq!(observed.exit_status, Some(ExitStatus::Code(1)));
        let RunState::Failed { reason } = &observed.state else {
            unreachable!()
        };
        assert!(reason.contains("exit code 1"), "{reason}");
        assert!(reason.contains("gave up after 3 restarts"), "{reason}");
        assert!(reason.contains("last output: run"), "{reason}");
        let log = std::fs::read_to_string(&observed.log_path).unwrap();
        assert_eq!(
            log.lines().filter(|l| *l == "run").count(),
            4,
            "first run + 3 restarts"
        );

        // A successful exit is not a failure and is not restarted.
        rt.start("vm-4", &spec("done", "exit 0")).await.unwrap();
        let observed = wait_for(WAIT, "the VM to end", || async {
            let o = rt.status("vm-4").await.unwrap();
            (!o.state.is_active()).then_some(o)
        })
        .await;
        assert_eq!(observed.state, RunState::Stopped);
        assert_eq!(observed.exit_status, Some(ExitStatus::Code(0)));
        assert_eq!(observed.restarts, 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_adopts_instead_of_starting_twice() {
    let dir = tempfile::tempdir().unwrap();
    let _guard = KillOnDrop::new(dir.path());
    bounded(async {
        let spec = spec("survivor", "echo started >> starts; exec sleep 600");
        let starts = dir.path().join("vm-5/starts");
        let first = ProcessRuntime::new(dir.path());
        let Started::Spawned { pid } = first.start("vm-5", &spec).await.unwrap() else {
            panic!("expected a spawn");
        };
        wait_for(WAIT, "the first run", || log_contains(&starts, "started")).await;
        // The node "crashes": its runtime goes away, the workload stays.
        drop(first);
        assert!(ProcessIdentity::of_pid(pid).is_some());

        // The restarted node reconciles the same desired state.
        let second = ProcessRuntime::new(dir.path());
        assert_eq!(
            second.start("vm-5", &spec).await.unwrap(),
            Started::Adopted { pid }
        );
        assert_eq!(
            second.status("vm-5").await.unwrap().state,
            RunState::Running
        );
        drop(second);

        // Or it recovers first, then reconciles.
        let third = ProcessRuntime::new(dir.path());
        assert_eq!(
            third.recover().await.unwrap(),
            vec![Recovered::Adopted {
                vm_id: "vm-5".into(),
                pid
            }]
        );
        assert_eq!(
            third.start("vm-5", &spec).await.unwrap(),
            Started::AlreadyRunning { pid: Some(pid) }
        );
        let runs = std::fs::read_to_string(&starts).unwrap();
        assert_eq!(runs.lines().count(), 1, "the workload ran once: {runs:?}");

        let stopped = third.stop("vm-5", GRACE).await.unwrap();
        assert_eq!(stopped.state, RunState::Stopped);
        assert_eq!(
            stopped.exit_status,
            Some(ExitStatus::Unknown),
            "only the dead node could have collected it"
        );
        wait_for(WAIT, "the adopted process to go", || async {
            ProcessIdentity::of_pid(pid).is_none().then_some(())
        })
        .await;

        // A pidfile whose process is gone is cleaned up, not adopted.
        drop(third);
        let exited = std::process::Command::new("true").spawn().unwrap();
        let dead = ProcessIdentity {
            pid: exited.id(),
            start_time: 1,
        };
        let mut exited = exited;
        exited.wait().unwrap();
        pidfile::write(&dir.path().join("vm-5"), dead).unwrap();
        let fourth = ProcessRuntime::new(dir.path());
        assert_eq!(
            fourth.recover().await.unwrap(),
            vec![Recovered::CleanedUp {
                vm_id: "vm-5".into()
            }]
        );
        assert!(matches!(
            fourth.start("vm-5", &spec).await.unwrap(),
            Started::Spawned { .. }
        ));
        fourth.stop("vm-5", GRACE).await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_after_restart_without_recover_finds_the_workload() {
    let dir = tempfile::tempdir().unwrap();
    let _guard = KillOnDrop::new(dir.path());
    bounded(async {
        let first = ProcessRuntime::new(dir.path());
        let Started::Spawned { pid } = first
            .start("vm-6", &spec("orphan", "exec sleep 600"))
            .await
            .unwrap()
        else {
            panic!("expected a spawn");
        };
        drop(first);
        // The desired state says "stopped": the new node stops it without
        // having started or recovered it.
        let second = ProcessRuntime::new(dir.path());
        let stopped = second.stop("vm-6", GRACE).await.unwrap();
        assert_eq!(stopped.state, RunState::Stopped);
        wait_for(WAIT, "the orphan to go", || async {
            ProcessIdentity::of_pid(pid).is_none().then_some(())
        })
        .await;
        assert!(matches!(
            second.stop("never-started", GRACE).await,
            Err(RuntimeError::UnknownVm { .. })
        ));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_specs_are_rejected_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let _guard = KillOnDrop::new(dir.path());
    bounded(async {
        let rt = ProcessRuntime::new(dir.path());
        let good = spec("fine", "exec sleep 600");
        let cases = [
            (
                VmSpec {
                    name: "Not_A_Label".into(),
                    ..good.clone()
                },
                SpecField::Name,
            ),
            (
                VmSpec {
                    vcpus: 0,
                    ..good.clone()
                },
                SpecField::Vcpus,
            ),
            (
                VmSpec {
                    vcpus: 65,
                    ..good.clone()
                },
                SpecField::Vcpus,
            ),
            (
                VmSpec {
                    memory_mib: 1,
                    ..good.clone()
                },
                SpecField::MemoryMib,
            ),
            (
                VmSpec {
                    runtime: "lxc".into(),
                    ..good.clone()
                },
                SpecField::Runtime,
            ),
            (
                VmSpec {
                    command: vec![],
                    ..good.clone()
                },
                SpecField::Command,
            ),
            (
                VmSpec {
                    runtime: "microvm".into(),
                    kernel: "/no/such/vmlinuz".into(),
                    ..good.clone()
                },
                SpecField::Kernel,
            ),
        ];
        for (bad, field) in cases {
            match rt.start("vm-7", &bad).await {
                Err(RuntimeError::InvalidSpec(e)) => {
                    assert_eq!(e.field, field, "{e}");
                    assert!(e.to_string().contains(field.as_str()), "{e}");
                }
                other => panic!("expected an invalid {field} error, got {other:?}"),
            }
        }
        // A valid microvm spec is still the wrong runtime here.
        let kernel = dir.path().join("vmlinuz");
        std::fs::write(&kernel, b"not really a kernel").unwrap();
        let microvm = VmSpec {
            runtime: "microvm".into(),
            kernel: kernel.display().to_string(),
            ..good.clone()
        };
        assert!(matches!(
            rt.start("vm-7", &microvm).await,
            Err(RuntimeError::WrongRuntime { .. })
        ));
        assert!(matches!(
            rt.start("../escape", &good).await,
            Err(RuntimeError::InvalidVmId { .. })
        ));
        assert!(rt.list().await.is_empty(), "nothing was started");
        assert!(pidfile::live_workloads(dir.path()).is_empty());
    })
    .await;
}

/// A workload started by a root node with a [`RunAs`] user runs as that
/// user, never as root, and its output still reaches the log the node
/// opened. (Not root: switching users must fail at spawn, not run the
/// workload as the node's user.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_run_as_the_configured_user() {
    let dir = tempfile::tempdir().unwrap();
    let _guard = KillOnDrop::new(dir.path());
    bounded(async {
        let nobody = tern_runtime::RunAs::lookup("nobody").unwrap();
        let rt = ProcessRuntime::with_options(
            dir.path(),
            tern_runtime::RestartPolicy::default(),
            Some(nobody.clone()),
        );
        let spec = spec(
            "who",
            "echo uid=$(id -u) gid=$(id -g) cwd=$(pwd); exec sleep 600",
        );
        let started = rt.start("vm-who", &spec).await;
        if rustix::process::getuid().is_root() {
            assert!(
                matches!(started, Ok(Started::Spawned { .. })),
                "{started:?}"
            );
            let log = dir.path().join("vm-who/workload.log");
            let expected = format!("uid={} gid={} cwd=/", nobody.uid, nobody.gid);
            wait_for(WAIT, "the workload's identity in its log", || {
                log_contains(&log, &expected)
            })
            .await;
            rt.stop("vm-who", std::time::Duration::from_secs(5))
                .await
                .unwrap();
        } else {
            let observed = rt.status("vm-who").await;
            assert!(
                started.is_err() || !matches!(observed.map(|o| o.state), Ok(RunState::Running)),
                "a non-root node switched users"
            );
        }
    })
    .await;
}
