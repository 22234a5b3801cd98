//! A cluster of real `tern run` processes on loopback, without namespaces
//! or root: what the cluster bench (`tern-bench cluster`) measures on.
//!
//! Each node listens on its own loopback address (`127.X.Y.N`, `X.Y` from
//! the lab's process id so that two runs do not collide) with fixed ports,
//! so a node killed and restarted comes back at the same addresses. The
//! lab's own client (a throw-away key, gRPC) calls the nodes in-process.
//! Every child is killed when the [`LocalCluster`] is dropped (SIGKILL),
//! on every exit path.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tern_node::config::Config;
use tern_node::node::NodeFile;
use tern_process_kit::TernProcess;
use tern_protocol::catalog::methods;
use tern_protocol::{PeerAddr, RpcClient, pb};
use tern_transport_dual::TransportConfig;

use crate::config;

/// gRPC port of every node (each on its own loopback address).
pub const GRPC_PORT: u16 = 7500;
/// iroh port of every node.
pub const IROH_PORT: u16 = 7501;
/// `/metrics` port of every node.
pub const METRICS_PORT: u16 = 9500;
/// Join token of the cluster.
pub const JOIN_TOKEN: &str = "tern-lab-local";
/// Environment variable whose value, when set, is the nodes' `RUST_LOG`
/// (otherwise `warn`): `warn,tern_commit_path=trace` logs each step of
/// every commit, for the commit-path profile in `tern-store`'s docs.
pub const NODE_LOG_ENV: &str = "TERN_NODE_RUST_LOG";
/// Bound on a node's start (debug builds on a busy machine are slow).
pub const START_BOUND: Duration = Duration::from_secs(120);
/// Bound on the cluster forming or settling after a restart.
pub const SETTLE_BOUND: Duration = Duration::from_secs(90);
/// Timeout of one of the lab client's calls while waiting for a state.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// One `tern run` child.
#[derive(Debug)]
pub struct LocalNode {
    /// 0-based index.
    pub index: usize,
    /// Its loopback address.
    pub ip: Ipv4Addr,
    /// Its data directory.
    pub dir: PathBuf,
    /// Its config file.
    pub config: PathBuf,
    /// Its log file (stdout and stderr).
    pub log: PathBuf,
    /// The running process, if any.
    pub child: Option<TernProcess>,
    /// Its node file, once it started.
    pub file: Option<NodeFile>,
}

impl LocalNode {
    /// The node's address for the lab's gRPC client.
    pub fn addr(&self) -> anyhow::Result<PeerAddr> {
        let file = self
            .file
            .as_ref()
            .with_context(|| format!("node {} has not started", self.index + 1))?;
        let mut addr = file
            .peer_addr()
            .map_err(|e| anyhow::anyhow!("node {}: {e}", self.index + 1))?;
        addr.iroh = None;
        Ok(addr)
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// `n` `tern run` processes on loopback forming one cluster.
pub struct LocalCluster {
    /// The nodes.
    pub nodes: Vec<LocalNode>,
    /// The lab's client (throw-away key, gRPC).
    pub client: Arc<dyn RpcClient>,
    tern: PathBuf,
    transport: TransportConfig,
    /// Indexes of the agents among `nodes`.
    agents: Vec<usize>,
}

impl std::fmt::Debug for LocalCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCluster")
            .field("nodes", &self.nodes.len())
            .field("transport", &self.transport.mode)
            .finish_non_exhaustive()
    }
}

/// A key of the lab's pool (an admin of the cluster: see [`crate::keys`]).
fn fresh_key() -> [u8; 32] {
    crate::keys::client_key()
}

/// The loopback network of this run: `127.X.Y.0` with `X.Y` from the pid.
fn loopback_base() -> (u8, u8) {
    let pid = std::process::id();
    // 127.0.0.0/16 is where other tools bind; stay above it.
    (((pid >> 8) % 200 + 20) as u8, (pid % 250) as u8)
}

/// One node's config: the kit's harness node on `ip` with this module's
/// ports and token, the pool's keys as admins, `transport`, and `seed` to
/// join through.
fn node_config(
    dir: &Path,
    ip: Ipv4Addr,
    seed: Option<&NodeFile>,
    transport: &TransportConfig,
) -> Config {
    let ports = config::Ports {
        grpc: GRPC_PORT,
        iroh: IROH_PORT,
        metrics: METRICS_PORT,
    };
    let mut c = config::node(dir, config::listen_on(ip, ports), JOIN_TOKEN);
    c.access.admins = crate::keys::admin_ids();
    c.transport = Some(transport.clone());
    if let Some(seed) = seed {
        config::join(&mut c, seed);
    }
    c
}

impl LocalCluster {
    /// Starts `size` nodes under `dir` with the `[transport]` section
    /// `transport`: the first creates the cluster, the others join it;
    /// returns once all are voters and a leader is known.
    pub async fn start(
        tern: &Path,
        dir: &Path,
        size: usize,
        transport: &TransportConfig,
    ) -> anyhow::Result<LocalCluster> {
        LocalCluster::start_tuned(tern, dir, size, transport, |_| {}).await
    }

    /// [`LocalCluster::start`] with every server's config passed through
    /// `tune` before it is written (shorter agent bounds, less capacity).
    pub async fn start_tuned(
        tern: &Path,
        dir: &Path,
        size: usize,
        transport: &TransportConfig,
        tune: impl Fn(&mut Config),
    ) -> anyhow::Result<LocalCluster> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let client: Arc<dyn RpcClient> = Arc::new(tern_transport_grpc::GrpcClient::new(
            tern_transport_grpc::ClientConfig::new(fresh_key()),
        ));
        let (x, y) = loopback_base();
        let mut cluster = LocalCluster {
            nodes: Vec::new(),
            client,
            tern: tern.to_owned(),
            transport: transport.clone(),
            agents: Vec::new(),
        };
        for i in 0..size {
            let ip = Ipv4Addr::new(127, x, y, u8::try_from(i + 1).unwrap_or(u8::MAX));
            let name = format!("n{}", i + 1);
            let node_dir = dir.join(&name);
            // A fresh data directory per run.
            let _ = std::fs::remove_dir_all(&node_dir);
            let seed = cluster
                .nodes
                .first()
                .and_then(|n: &LocalNode| n.file.clone());
            let config = dir.join(format!("{name}.toml"));
            let mut c = node_config(&node_dir, ip, seed.as_ref(), &cluster.transport);
            tune(&mut c);
            config::write(&config, &c)?;
            cluster.nodes.push(LocalNode {
                index: i,
                ip,
                dir: node_dir,
                config,
                log: dir.join(format!("{name}.log")),
                child: None,
                file: None,
            });
            cluster.start_node(i).await?;
        }
        cluster.wait_formed().await?;
        Ok(cluster)
    }

    /// Starts (or restarts) node `i` with its config and waits until it
    /// wrote its node file.
    pub async fn start_node(&mut self, i: usize) -> anyhow::Result<()> {
        let node = self
            .nodes
            .get_mut(i)
            .with_context(|| format!("no node {}", i + 1))?;
        let mut cmd = TernProcess::command(&self.tern, &node.config);
        // Quiet unless asked: `TERN_NODE_RUST_LOG` is the nodes' filter when
        // set (a profile of the commit path sets
        // `warn,tern_commit_path=trace`).
        cmd.env(
            "RUST_LOG",
            std::env::var(NODE_LOG_ENV).unwrap_or_else(|_| "warn".to_owned()),
        );
        let child = node
            .child
            .insert(TernProcess::spawn(cmd, &node.dir, &node.log)?);
        let file = child
            .wait_node_file::<NodeFile>(START_BOUND)
            .await
            .with_context(|| format!("node {}", i + 1))?;
        node.file = Some(file);
        Ok(())
    }

    /// Starts an agent (`[node] role = "agent"`) registering through the
    /// first node, on the next loopback address; answers its index. It is
    /// not counted by [`LocalCluster::wait_formed`], which looks at
    /// servers only.
    pub async fn add_agent(&mut self, dir: &Path) -> anyhow::Result<usize> {
        let seed = self
            .nodes
            .first()
            .and_then(|n| n.file.clone())
            .context("the first server has not started")?;
        let i = self.nodes.len();
        let (x, y) = loopback_base();
        let ip = Ipv4Addr::new(127, x, y, u8::try_from(i + 1).unwrap_or(u8::MAX));
        let name = format!("a{}", i + 1);
        let node_dir = dir.join(&name);
        let _ = std::fs::remove_dir_all(&node_dir);
        let mut c = node_config(&node_dir, ip, Some(&seed), &self.transport);
        c.node.role = tern_node::config::Role::Agent;
        let config = dir.join(format!("{name}.toml"));
        config::write(&config, &c)?;
        self.nodes.push(LocalNode {
            index: i,
            ip,
            dir: node_dir,
            config,
            log: dir.join(format!("{name}.log")),
            child: None,
            file: None,
        });
        self.agents.push(i);
        self.start_node(i).await?;
        Ok(i)
    }

    /// Rewrites server `i`'s config as an agent's (`[node] role =
    /// "agent"`, no join token: a demoted server's key is registered
    /// already) and counts it among the agents from now on; start it with
    /// [`LocalCluster::start_node`].
    pub fn make_agent(&mut self, i: usize) -> anyhow::Result<()> {
        let node = self
            .nodes
            .get(i)
            .with_context(|| format!("no node {}", i + 1))?;
        let mut c = config::read(&node.config)?;
        c.node.role = tern_node::config::Role::Agent;
        c.cluster.join_token = None;
        config::write(&node.config, &c)?;
        if !self.agents.contains(&i) {
            self.agents.push(i);
        }
        Ok(())
    }

    /// Waits (at most `bound`) until node `i`'s process exits by itself;
    /// its exit status, `None` if it still runs (or never ran).
    pub async fn wait_exit(
        &mut self,
        i: usize,
        bound: Duration,
    ) -> anyhow::Result<Option<std::process::ExitStatus>> {
        let deadline = Instant::now() + bound;
        let node = self
            .nodes
            .get_mut(i)
            .with_context(|| format!("no node {}", i + 1))?;
        loop {
            let Some(child) = node.child.as_mut() else {
                return Ok(None);
            };
            if let Some(status) = child.try_wait() {
                node.child = None;
                return Ok(Some(status));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILLs node `i` (no handover, no flush beyond what Raft already
    /// made durable) and reaps it.
    pub async fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        let node = self
            .nodes
            .get_mut(i)
            .with_context(|| format!("no node {}", i + 1))?;
        if let Some(mut child) = node.child.take() {
            child.kill();
        }
        Ok(())
    }

    /// The members and leader as node `i` sees them.
    pub async fn members(&self, i: usize) -> anyhow::Result<pb::MembersResponse> {
        let addr = self.nodes[i].addr()?;
        Ok(tern_protocol::rpc::call_typed(
            self.client.as_ref(),
            &addr,
            methods::CLUSTER_MEMBERS,
            &pb::MembersRequest {},
            PROBE_TIMEOUT,
        )
        .await?)
    }

    /// The index of the node with Raft id `raft_id`, from a members list.
    fn index_of(&self, members: &pb::MembersResponse, raft_id: u64) -> Option<usize> {
        let m = members.members.iter().find(|m| m.node_id == raft_id)?;
        let id = m.address.as_ref()?.endpoint_id.clone();
        let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
        self.nodes
            .iter()
            .position(|n| n.file.as_ref().is_some_and(|f| f.id == hex))
    }

    /// Waits until every running node sees all nodes as voters and the
    /// same leader; returns the leader's index and Raft id.
    pub async fn wait_formed(&self) -> anyhow::Result<(usize, u64)> {
        let deadline = Instant::now() + SETTLE_BOUND;
        let mut last = String::new();
        loop {
            match self.formed().await {
                Ok(Some(found)) => return Ok(found),
                Ok(None) => {}
                Err(e) => last = format!("{e:#}"),
            }
            if Instant::now() > deadline {
                bail!(
                    "the cluster did not form (all voters, one leader) within {SETTLE_BOUND:?} (last error: {last})"
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn formed(&self) -> anyhow::Result<Option<(usize, u64)>> {
        let mut view: Option<pb::MembersResponse> = None;
        let servers = self.nodes.len() - self.agents.len();
        for node in self
            .nodes
            .iter()
            .filter(|n| n.child.is_some() && !self.agents.contains(&n.index))
        {
            let m = self.members(node.index).await?;
            let voters = m.members.iter().filter(|m| m.voter).count();
            if voters != servers || m.leader_id == 0 {
                return Ok(None);
            }
            if view.as_ref().is_some_and(|v| v.leader_id != m.leader_id) {
                return Ok(None);
            }
            view = Some(m);
        }
        let Some(m) = view else {
            bail!("no node is running")
        };
        Ok(self.index_of(&m, m.leader_id).map(|i| (i, m.leader_id)))
    }

    /// The current leader's index and Raft id, among running nodes.
    pub async fn leader(&self) -> anyhow::Result<(usize, u64)> {
        let deadline = Instant::now() + SETTLE_BOUND;
        loop {
            for node in self.nodes.iter().filter(|n| n.child.is_some()) {
                if let Ok(m) = self.members(node.index).await
                    && m.leader_id != 0
                    && let Some(i) = self.index_of(&m, m.leader_id)
                    && self.nodes[i].child.is_some()
                {
                    return Ok((i, m.leader_id));
                }
            }
            if Instant::now() > deadline {
                bail!("no leader among the running nodes within {SETTLE_BOUND:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops every node (SIGKILL; the data is thrown away).
    pub async fn shutdown(&mut self) {
        for i in 0..self.nodes.len() {
            let _ = self.kill(i).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_name_the_node_address_and_the_seed() {
        let seed = NodeFile {
            id: "ab".repeat(32),
            grpc: Some("https://127.9.9.1:7500".into()),
            iroh: Some(vec!["127.9.9.1:7501".parse().unwrap()]),
            metrics: None,
            pid: 1,
        };
        let ip = Ipv4Addr::new(127, 9, 9, 2);
        let text = node_config(Path::new("/d/n2"), ip, Some(&seed), &config::iroh())
            .to_toml()
            .unwrap();
        assert!(text.contains("grpc = \"127.9.9.2:7500\""), "{text}");
        assert!(text.contains("iroh = \"127.9.9.2:7501\""), "{text}");
        let checked = Config::parse(&text).unwrap();
        assert_eq!(checked.seeds[0].1.grpc, seed.grpc);
        assert_eq!(checked.config.cluster.join[0].iroh, seed.iroh.unwrap());
        assert!(checked.policy.uses_iroh());
        let first = node_config(Path::new("/d/n1"), ip, None, &config::grpc());
        assert!(first.cluster.join.is_empty());
        let (x, y) = loopback_base();
        assert!(x >= 20 && u16::from(y) < 250);
    }
}
