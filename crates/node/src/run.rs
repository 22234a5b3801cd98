//! `tern run`: start a [`Node`] and serve until a signal.
//!
//! - **SIGTERM / Ctrl-C (SIGINT):** graceful shutdown within
//!   [`SHUTDOWN_DEADLINE`] ([`Node::shutdown`]).
//! - **Raft failure** (a failed log write or sync; openraft stops on any
//!   storage error): logged with what failed and what to check, the node
//!   stops as on SIGTERM, and `tern run` exits non-zero
//!   ([`StartError::RaftFailed`]). Health reports it not live meanwhile.
//! - **Demoted** (`tern cluster demote` of this server): logged with what
//!   to do, the node stops after [`DEMOTED_EXIT_GRACE`] as on SIGTERM (its
//!   VMs run on, as over any restart), and `tern run` exits with code 2
//!   naming `node.role`: it must be started again with `role = "agent"`.
//!   A server whose data directory says it was demoted refuses to start
//!   the same way.
//! - **SIGHUP:** re-read the config file and apply its `[transport]`
//!   section atomically ([`Node::set_pin`]), logging the old and new
//!   policy. A `[transport]` section pins the policy (the emergency
//!   override; no quorum needed); a file without one unpins it, and the
//!   node runs the cluster's desired policy for it again (or the
//!   default). A file that does not check is logged with the key at fault
//!   and the old policy stays. Other sections need a restart; a change to
//!   them is logged and ignored.

use std::path::{Path, PathBuf};

use tokio::signal::unix::{SignalKind, signal};

use crate::config::{Checked, Config, ConfigError};
use crate::node::{Node, SHUTDOWN_DEADLINE, StartError};

/// How long a server that learned of its demotion keeps running before it
/// stops: its acknowledgement of the entries that told it reaches the
/// leader, which waits for it before it takes the node out of the
/// membership.
pub const DEMOTED_EXIT_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Installs the log subscriber: `RUST_LOG` filter, `info` by default, to
/// stderr.
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Loads the configuration `tern run` uses: the file, or the defaults
/// (a single-node cluster in `./tern-data` on loopback) without one.
pub fn load(config: Option<&Path>) -> Result<Checked, ConfigError> {
    match config {
        Some(path) => Config::load(path),
        None => Config::default().check(),
    }
}

/// Re-reads `path` and applies its `[transport]` section to `node` (its
/// presence pins the policy, its absence unpins it).
/// Returns the file as applied, or `None` when it was refused (logged
/// with the key; the old policy stays).
pub fn reload(node: &Node, path: &Path, running: &Checked) -> Option<Checked> {
    match Config::load(path) {
        Ok(new) => {
            let (a, b) = (&running.config, &new.config);
            if a.data_dir != b.data_dir
                || a.listen.grpc != b.listen.grpc
                || a.listen.iroh != b.listen.iroh
                || a.listen.metrics != b.listen.metrics
                || a.cluster.join_token != b.cluster.join_token
            {
                tracing::warn!(
                    "config reload: only [transport] is applied on SIGHUP; restart the node for changes to data_dir, [listen] or [cluster]"
                );
            }
            if let Err(why) = node.set_pin(new.pin()) {
                tracing::error!(
                    key = "transport.mode",
                    why,
                    "config reload refused (listen.iroh was off at start); the old policy stays"
                );
                return None;
            }
            tracing::info!(
                pinned = new.pin().is_some(),
                source = %node.policy_source(),
                "config reload applied"
            );
            Some(new)
        }
        Err(e) => {
            tracing::error!(key = %e.key, error = %e, "config reload refused; the old transport policy stays");
            None
        }
    }
}

/// Runs a node until SIGTERM or Ctrl-C, reloading on SIGHUP.
pub async fn run(config_path: Option<PathBuf>) -> Result<(), StartError> {
    let checked = load(config_path.as_deref())?;
    let mut running = checked.clone();
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| StartError::Failed(format!("installing the SIGTERM handler: {e}")))?;
    let mut hup = signal(SignalKind::hangup())
        .map_err(|e| StartError::Failed(format!("installing the SIGHUP handler: {e}")))?;
    let mut int = signal(SignalKind::interrupt())
        .map_err(|e| StartError::Failed(format!("installing the SIGINT handler: {e}")))?;
    // A signal during start-up stops the start (e.g. a join retrying).
    let node = tokio::select! {
        node = Node::start(checked) => node?,
        _ = term.recv() => return Err(StartError::Failed("stopped by SIGTERM while starting".into())),
        _ = int.recv() => return Err(StartError::Failed("stopped by Ctrl-C while starting".into())),
    };
    let mut failure = None;
    let mut demoted = None;
    loop {
        tokio::select! {
            () = node.demoted() => {
                let id = node.raft_id();
                tracing::error!(
                    node = id,
                    "this server was demoted to an agent (tern cluster demote): it stops now; set \
                     role = \"agent\" under [node] and start it again (no join token needed); its \
                     VMs run on meanwhile"
                );
                // Let the acknowledgement of the entries that told it
                // reach the leader before the transports close.
                tokio::time::sleep(DEMOTED_EXIT_GRACE).await;
                demoted = Some(id);
                break;
            }
            why = node.raft_failure() => {
                tracing::error!(
                    failure = %why,
                    data_dir = %node.data_dir().display(),
                    "Raft stopped on a failure; this node stops and exits"
                );
                failure = Some(why);
                break;
            }
            _ = term.recv() => { tracing::info!("SIGTERM"); break; }
            _ = int.recv() => { tracing::info!("interrupted"); break; }
            _ = hup.recv() => match &config_path {
                Some(path) => {
                    tracing::info!(file = %path.display(), "SIGHUP: reloading [transport]");
                    if let Some(new) = reload(&node, path, &running) {
                        // Sections that need a restart keep their values
                        // at start, so a later reload warns again.
                        running.policy = new.policy;
                        running.config.transport = new.config.transport;
                    }
                }
                None => tracing::warn!("SIGHUP: no config file to reload (start with --config FILE)"),
            },
        }
    }
    node.shutdown(SHUTDOWN_DEADLINE).await;
    if let Some(id) = demoted {
        return Err(crate::node::demoted_error(id));
    }
    match failure {
        Some(why) => Err(StartError::RaftFailed(why)),
        None => Ok(()),
    }
}
