//! The demo's steady calls: `Status/Get` to every node and `Vm/Get` to
//! every server (agents serve no VM calls) over both transports, one
//! round after another, each call counted as ok or failed per transport.
//!
//! The calls use the demo's operator key (see `load_conns` in the demo's
//! module for why not a node's). Both transports thus carry calls whatever
//! policy a node runs, so the rollout's gates have figures on both sides.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tern_protocol::catalog::methods;
use tern_protocol::pb;
use tokio::sync::watch;

use crate::client::Conn;
use crate::error::CliError;

/// The pause between two rounds of calls.
pub const ROUND_PAUSE: Duration = Duration::from_millis(40);

/// The two transports, as the metrics name them.
pub const TRANSPORTS: [&str; 2] = ["grpc", "iroh"];

/// Calls made so far, per transport (index into [`TRANSPORTS`]).
#[derive(Debug, Default)]
pub struct Counts {
    ok: [AtomicU64; 2],
    failed: [AtomicU64; 2],
    last_error: std::sync::Mutex<Option<String>>,
}

impl Counts {
    /// Calls that succeeded over transport `t`.
    pub fn ok(&self, t: usize) -> u64 {
        self.ok[t].load(Ordering::Relaxed)
    }

    /// Calls that failed over transport `t`.
    pub fn failed(&self, t: usize) -> u64 {
        self.failed[t].load(Ordering::Relaxed)
    }

    /// Every failed call.
    pub fn failed_total(&self) -> u64 {
        self.failed(0) + self.failed(1)
    }

    /// Every call.
    pub fn total(&self) -> u64 {
        self.ok(0) + self.ok(1) + self.failed_total()
    }

    /// The newest failure, in words.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok()?.clone()
    }

    fn record(&self, t: usize, node: usize, what: &str, r: Result<(), CliError>) {
        match r {
            Ok(()) => {
                self.ok[t].fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.failed[t].fetch_add(1, Ordering::Relaxed);
                if let Ok(mut last) = self.last_error.lock() {
                    *last = Some(format!("{what} to node {node} over {}: {e}", TRANSPORTS[t]));
                }
            }
        }
    }
}

/// The running calls; [`Load::finish`] stops them.
pub struct Load {
    /// The counts, shared with the task.
    pub counts: Arc<Counts>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Vec<Conn>>,
}

impl Load {
    /// Starts the calls: `conns[t][i]` reaches node `i + 1` over
    /// transport `t`, the first `servers` of them servers; `vm_id` is read
    /// with `Vm/Get` from the servers.
    pub fn start(conns: [Vec<Conn>; 2], servers: usize, vm_id: String) -> Load {
        let counts = Arc::new(Counts::default());
        let (stop, mut stopped) = watch::channel(false);
        let c = counts.clone();
        let task = tokio::spawn(async move {
            while !*stopped.borrow() {
                round(&conns, servers, &vm_id, &c).await;
                tokio::select! {
                    _ = stopped.changed() => {}
                    _ = tokio::time::sleep(ROUND_PAUSE) => {}
                }
            }
            conns.into_iter().flatten().collect()
        });
        Load { counts, stop, task }
    }

    /// Stops the calls after the round in flight and closes their
    /// connections.
    pub async fn finish(self) {
        let _ = self.stop.send(true);
        if let Ok(conns) = self.task.await {
            for c in conns {
                c.close().await;
            }
        }
    }
}

/// One call of each kind to every node (`Vm/Get` to the first
/// `servers`) over both transports.
async fn round(conns: &[Vec<Conn>; 2], servers: usize, vm_id: &str, counts: &Counts) {
    for (t, per_node) in conns.iter().enumerate() {
        for (i, conn) in per_node.iter().enumerate() {
            let status = conn
                .call::<_, pb::NodeStatus>(methods::STATUS_GET, &pb::StatusRequest {})
                .await
                .map(drop);
            counts.record(t, i + 1, "Status/Get", status);
            if i >= servers {
                continue;
            }
            let vm = conn
                .call::<_, pb::VmRecord>(
                    methods::VM_GET,
                    &pb::GetVmRequest {
                        vm_id: vm_id.to_owned(),
                    },
                )
                .await
                .map(drop);
            counts.record(t, i + 1, "Vm/Get", vm);
        }
    }
}
