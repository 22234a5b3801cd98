//! Shared support for the runtime tests: a guard that kills every workload
//! a test's runtimes started (also when the test fails), bounded polling,
//! and the microVM test assets (QEMU, a Debian cloud kernel, a busybox
//! initramfs).

#![allow(dead_code)] // reason: each test binary uses a different part of the shared support.

pub(crate) mod microvm_assets;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tern_runtime::pidfile;

/// Kills, on drop, every live workload recorded under a runtime state dir,
/// so no test leaves a process behind, whether it passes or panics.
pub(crate) struct KillOnDrop {
    dir: PathBuf,
}

impl KillOnDrop {
    /// Guards the workloads recorded under `dir`.
    pub(crate) fn new(dir: &Path) -> Self {
        KillOnDrop {
            dir: dir.to_owned(),
        }
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for (vm_id, identity) in pidfile::live_workloads(&self.dir) {
            eprintln!(
                "test guard: killing leftover workload {vm_id} (pid {})",
                identity.pid
            );
            let _ = identity.signal_group(rustix::process::Signal::KILL);
        }
    }
}

/// Polls `check` every 20 ms until it returns `Some`, failing the test with
/// `what` after `bound`.
pub(crate) async fn wait_for<T, F, Fut>(bound: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let poll = async {
        loop {
            if let Some(value) = check().await {
                return value;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    match tokio::time::timeout(bound, poll).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {bound:?} waiting for {what}"),
    }
}
