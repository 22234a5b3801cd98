//! A cluster of real `tern run` processes, one per namespace, on one
//! switch; a client namespace on the same switch for the lab's own calls.
//!
//! [`Cluster::start`] writes each node's config (listen addresses on the
//! node's own address, the `[transport]` section the scenario asks for,
//! `[cluster] join` pointing at node 1), starts node 1, then the others
//! one by one, and waits until every node is a member (up to five
//! voters, the rest learners: `[cluster] max_voters`) and a leader is
//! known. Then a scenario can find the leader, SIGKILL and restart a node,
//! reload a node's `[transport]` by SIGHUP, scrape `/metrics`
//! ([`Metrics`]), run the CLI against a node ([`Cluster::cli`]) and drive
//! client traffic from the client namespace ([`Traffic`]).
//!
//! Layout: node `i` (1-based) lives in namespace `{prefix}-n{i}` with
//! interface `{prefix}n{i}` at `subnet.host(10 + i)`; the client in
//! `{prefix}-cl` at `subnet.host(2)`; the switch is `{prefix}-sw`. Files
//! go to `LAB_DIR/n{i}.toml`, `LAB_DIR/n{i}/` (data) and `LAB_DIR/n{i}.log`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;
use tern_node::config::{Config, Listen, NetworkSection};
use tern_node::node::NodeFile;
use tern_testkit::{TernProcess, config};
use tern_transport_dual::{RaftTransport, TransportConfig};

use crate::netns::{Cidr, Iface, Lab, Netns, Switch};
use crate::report::Latencies;

// The one exposition parser and the one traffic recorder, from the kit.
pub use tern_process_kit::exposition::{Metrics, Sample, by_label, deltas, quantile_of, sum_all};
pub use tern_testkit::traffic::{
    CALL_TIMEOUT, CallRecord, Client as LabClient, Traffic, TrafficSpec, failures, longest_gap,
};

/// Port of every node's gRPC listener (each node has its own address).
pub const GRPC_PORT: u16 = 7400;
/// Port of every node's iroh (UDP) listener.
pub const IROH_PORT: u16 = 7401;
/// Port of every node's `/metrics`.
pub const METRICS_PORT: u16 = 9400;
/// The join token the lab's clusters share.
pub const JOIN_TOKEN: &str = "tern-lab-token";
/// Bound on a node's start (a joiner included: it waits to be caught up).
pub const START_BOUND: Duration = Duration::from_secs(120);
/// Bound on a state the cluster converges to (voters, leader, policy).
pub const CONVERGE_BOUND: Duration = Duration::from_secs(90);
/// Bound on a node's graceful stop.
pub const STOP_BOUND: Duration = Duration::from_secs(30);
/// Pause between polls of a converging state.
pub const POLL: Duration = Duration::from_millis(250);

/// What cluster to build.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// Number of nodes.
    pub size: usize,
    /// The `[transport]` section every node starts with.
    pub transport: TransportConfig,
    /// The switch's address range.
    pub subnet: Cidr,
    /// Bind iroh (UDP) and `/metrics` to `0.0.0.0` instead of the node's
    /// address (gRPC stays on it: a gRPC URL must name a real address).
    /// With it, a node whose address changes can still send from the new
    /// one (QUIC connection migration); iroh then advertises the
    /// interface addresses it finds.
    pub iroh_any: bool,
    /// The `[network]` section every node starts with (VM networking;
    /// off by default). A node runs inside its own namespace, so with no
    /// `host_netns` its VM bridge and devices live there.
    pub network: NetworkSection,
    /// Write `transport` into every node's file (`[transport]`, the
    /// emergency pin: the cluster's policies are then ignored). Off, the
    /// nodes run the cluster's policy for them (the default, `grpc`,
    /// until an operator or the rollout sets one): the rollout needs it
    /// off.
    pub pin_transport: bool,
    /// Applied to every server's config before it is written (agent
    /// settings, a capacity that keeps VMs on agents).
    pub tune: Option<fn(&mut Config)>,
}

impl ClusterSpec {
    /// `size` nodes on `10.77.0.0/24` with `transport`.
    pub fn new(size: usize, transport: &TransportConfig) -> ClusterSpec {
        ClusterSpec {
            size,
            transport: transport.clone(),
            subnet: Cidr::new(std::net::Ipv4Addr::new(10, 77, 0, 0), 24),
            iroh_any: false,
            network: NetworkSection::default(),
            pin_transport: true,
            tune: None,
        }
    }
}

impl ClusterSpec {
    /// A server's config in `slot`, joining through `seed`.
    fn server_config(&self, slot: &NodeSlot, seed: Option<&NodeFile>) -> Config {
        let mut c = node_config(&slot.dir, slot.iface.addr.addr, seed, &self.transport);
        if self.iroh_any {
            listen_any(&mut c);
        }
        c.transport = c.transport.filter(|_| self.pin_transport);
        c.network = self.network.clone();
        if let Some(tune) = self.tune {
            tune(&mut c);
        }
        c
    }
}

/// The `[transport]` section for dual mode preferring iroh for `prefer`
/// (`"all_except_raft"` or service names) with Raft over `raft`, fallback
/// on.
pub fn dual_section(prefer: &[&str], raft: RaftTransport) -> TransportConfig {
    config::dual(prefer, raft)
}

/// One node's config: the kit's harness node on `listen` with the lab's
/// ports and join token, the lab's keys as admins, `transport`, and `seed`
/// to join through (none for the first node). The one config generator of
/// the lab (the loopback cluster's is the kit's own).
pub fn node_config(
    data_dir: &Path,
    listen: std::net::Ipv4Addr,
    seed: Option<&NodeFile>,
    transport: &TransportConfig,
) -> Config {
    let ports = config::Ports {
        grpc: GRPC_PORT,
        iroh: IROH_PORT,
        metrics: METRICS_PORT,
    };
    let mut c = config::node(data_dir, config::listen_on(listen, ports), JOIN_TOKEN);
    c.access.admins = crate::keys::admin_ids();
    c.transport = Some(transport.clone());
    if let Some(seed) = seed {
        config::join(&mut c, seed);
    }
    c
}

/// `config` with iroh and `/metrics` listening on `0.0.0.0` instead of
/// the node's address (see [`ClusterSpec::iroh_any`]).
pub fn listen_any(config: &mut Config) {
    let any = std::net::Ipv4Addr::UNSPECIFIED;
    config.listen.iroh = Listen::On(std::net::SocketAddr::from((any, IROH_PORT)));
    config.listen.metrics = Listen::On(std::net::SocketAddr::from((any, METRICS_PORT)));
}

/// One node of the cluster.
#[derive(Debug)]
pub struct NodeSlot {
    /// 1-based index.
    pub index: usize,
    /// Its namespace.
    pub ns: Netns,
    /// Its interface on the switch.
    pub iface: Iface,
    /// Data directory.
    pub dir: PathBuf,
    /// Config file.
    pub config: PathBuf,
    /// Log file.
    pub log: PathBuf,
    /// The running process, if any.
    pub proc: Option<TernProcess>,
    /// What the node wrote about itself when it last started.
    pub file: Option<NodeFile>,
    /// Its Raft node id, once known.
    pub raft_id: Option<u64>,
}

impl NodeSlot {
    /// The node file, or an error naming the node.
    pub fn node_file(&self) -> anyhow::Result<&NodeFile> {
        self.file
            .as_ref()
            .with_context(|| format!("node n{} has not started", self.index))
    }

    /// The last lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// A server (`n1`, 1-based) or an agent (`a1`) of a [`Cluster`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    /// Server `i`.
    Node(usize),
    /// Agent `k`.
    Agent(usize),
}

impl std::fmt::Display for Who {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Who::Node(i) => write!(f, "node n{i}"),
            Who::Agent(k) => write!(f, "agent a{k}"),
        }
    }
}

/// A running cluster.
#[derive(Debug)]
pub struct Cluster {
    lab: Lab,
    tern: PathBuf,
    /// The switch every node is plugged into.
    pub switch: Switch,
    /// The client namespace.
    pub client: Netns,
    /// The client's interface.
    pub client_iface: Iface,
    /// The nodes (servers), index 0 = node 1.
    pub nodes: Vec<NodeSlot>,
    /// The agents ([`Cluster::add_agent`]), index 0 = agent 1, each in
    /// its own namespace on the switch (`a1`, `a2`, ...).
    pub agents: Vec<NodeSlot>,
    spec: ClusterSpec,
}

impl Cluster {
    /// Builds the topology and starts the cluster (see the module docs);
    /// `progress` is told about each node as it comes up.
    pub async fn start(
        lab: &Lab,
        tern: &Path,
        spec: ClusterSpec,
        progress: &mut dyn FnMut(String),
    ) -> anyhow::Result<Cluster> {
        if spec.size == 0 {
            bail!("a cluster needs at least one node");
        }
        let switch = lab.switch("sw", spec.subnet)?;
        let client = lab.namespace("cl")?;
        let client_iface = lab.plug(&client, &switch, "cl", spec.subnet.host(2))?;
        let mut nodes = Vec::new();
        for i in 1..=spec.size {
            let ns = lab.namespace(&format!("n{i}"))?;
            let addr = spec
                .subnet
                .host(10 + u32::try_from(i).unwrap_or(u32::MAX - 10));
            let iface = lab.plug(&ns, &switch, &format!("n{i}"), addr)?;
            nodes.push(NodeSlot {
                index: i,
                ns,
                iface,
                dir: lab.dir().join(format!("n{i}")),
                config: lab.dir().join(format!("n{i}.toml")),
                log: lab.dir().join(format!("n{i}.log")),
                proc: None,
                file: None,
                raft_id: None,
            });
        }
        let mut cluster = Cluster {
            lab: lab.clone(),
            tern: tern.to_owned(),
            switch,
            client,
            client_iface,
            nodes,
            agents: Vec::new(),
            spec,
        };
        for i in 1..=cluster.nodes.len() {
            let seed = if i == 1 {
                None
            } else {
                Some(cluster.node(1)?.node_file()?.clone())
            };
            let slot = cluster.node(i)?;
            let c = cluster.spec.server_config(slot, seed.as_ref());
            config::write(&slot.config, &c)?;
            cluster.start_node(i).await?;
            progress(format!(
                "n{i} up at {} (pid {})",
                cluster.node(i)?.iface.addr.addr,
                cluster.node(i)?.proc.as_ref().map_or(0, TernProcess::pid)
            ));
        }
        cluster.wait_formed().await?;
        Ok(cluster)
    }

    /// The lab.
    pub fn lab(&self) -> &Lab {
        &self.lab
    }

    /// Node `i` (1-based).
    pub fn node(&self, i: usize) -> anyhow::Result<&NodeSlot> {
        i.checked_sub(1)
            .and_then(|k| self.nodes.get(k))
            .with_context(|| {
                format!(
                    "there is no node n{i} (the cluster has {})",
                    self.nodes.len()
                )
            })
    }

    fn node_mut(&mut self, i: usize) -> anyhow::Result<&mut NodeSlot> {
        let n = self.nodes.len();
        i.checked_sub(1)
            .and_then(|k| self.nodes.get_mut(k))
            .with_context(|| format!("there is no node n{i} (the cluster has {n})"))
    }

    /// Indices of every node.
    pub fn indices(&self) -> Vec<usize> {
        (1..=self.nodes.len()).collect()
    }

    /// Adds an agent (`[node] role = "agent"`) in a namespace of its own
    /// on the switch, registering through node 1 with the lab's token;
    /// starts it and answers its 1-based index.
    pub async fn add_agent(&mut self) -> anyhow::Result<usize> {
        let k = self.agents.len() + 1;
        let ns = self.lab.namespace(&format!("a{k}"))?;
        let addr = self
            .spec
            .subnet
            .host(100 + u32::try_from(k).unwrap_or(u32::MAX - 100));
        let iface = self.lab.plug(&ns, &self.switch, &format!("a{k}"), addr)?;
        let slot = NodeSlot {
            index: k,
            ns,
            iface,
            dir: self.lab.dir().join(format!("a{k}")),
            config: self.lab.dir().join(format!("a{k}.toml")),
            log: self.lab.dir().join(format!("a{k}.log")),
            proc: None,
            file: None,
            raft_id: None,
        };
        let seed = self.node(1)?.node_file()?.clone();
        let mut c = node_config(
            &slot.dir,
            slot.iface.addr.addr,
            Some(&seed),
            &self.spec.transport,
        );
        c.transport = c.transport.filter(|_| self.spec.pin_transport);
        c.node.role = tern_node::config::Role::Agent;
        config::write(&slot.config, &c)?;
        self.agents.push(slot);
        self.start_agent(k).await?;
        Ok(k)
    }

    /// Agent `k` (1-based).
    pub fn agent(&self, k: usize) -> anyhow::Result<&NodeSlot> {
        k.checked_sub(1)
            .and_then(|i| self.agents.get(i))
            .with_context(|| format!("there is no agent a{k}"))
    }

    /// Starts (or restarts) agent `k` and waits for its node file.
    pub async fn start_agent(&mut self, k: usize) -> anyhow::Result<()> {
        let lab = self.lab.clone();
        let tern = self.tern.clone();
        let slot = k
            .checked_sub(1)
            .and_then(|i| self.agents.get_mut(i))
            .with_context(|| format!("there is no agent a{k}"))?;
        spawn_slot(&lab, &tern, slot, &format!("agent a{k}")).await
    }

    /// SIGKILLs agent `k` (its workloads outlive it, as workloads do).
    pub fn kill_agent(&mut self, k: usize) -> anyhow::Result<()> {
        let slot = k
            .checked_sub(1)
            .and_then(|i| self.agents.get_mut(i))
            .with_context(|| format!("there is no agent a{k}"))?;
        if let Some(mut p) = slot.proc.take() {
            p.kill();
        }
        Ok(())
    }

    /// Starts (or restarts) node `i` with its config and waits until it has
    /// written its node file.
    pub async fn start_node(&mut self, i: usize) -> anyhow::Result<()> {
        let lab = self.lab.clone();
        let tern = self.tern.clone();
        let slot = self.node_mut(i)?;
        spawn_slot(&lab, &tern, slot, &format!("node n{i}")).await
    }
}

/// Starts `slot`'s `tern` in its namespace and waits for its node file.
async fn spawn_slot(lab: &Lab, tern: &Path, slot: &mut NodeSlot, what: &str) -> anyhow::Result<()> {
    {
        let mut cmd = TernProcess::command(tern, &slot.config);
        // `TERN_LAB_NODE_LOG` overrides the nodes' filter (e.g.
        // `info,iroh=debug` to see iroh's path discovery).
        let filter = std::env::var("TERN_LAB_NODE_LOG").unwrap_or_else(|_| "info".to_owned());
        cmd.env("RUST_LOG", filter);
        let proc = slot
            .proc
            .insert(lab.spawn_tern(&slot.ns, cmd, &slot.dir, &slot.log)?);
        let file = proc
            .wait_node_file::<NodeFile>(START_BOUND)
            .await
            .with_context(|| what.to_owned())?;
        slot.file = Some(file);
        Ok(())
    }
}

impl Cluster {
    /// SIGKILLs node `i`.
    pub fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        let slot = self.node_mut(i)?;
        if let Some(mut p) = slot.proc.take() {
            p.kill();
        }
        Ok(())
    }

    /// Stops node `i` with SIGTERM (bounded); true when it exited cleanly.
    pub async fn stop(&mut self, i: usize) -> anyhow::Result<bool> {
        let slot = self.node_mut(i)?;
        Ok(match slot.proc.take() {
            Some(mut p) => p.stop(STOP_BOUND).await.is_some_and(|s| s.success()),
            None => true,
        })
    }

    /// Whether node `i`'s process is running.
    pub fn is_running(&mut self, i: usize) -> bool {
        self.node_mut(i)
            .ok()
            .and_then(|s| s.proc.as_mut())
            .is_some_and(TernProcess::is_running)
    }

    /// Rewrites node `i`'s `[transport]` section and sends SIGHUP.
    pub fn set_transport(&mut self, i: usize, section: &TransportConfig) -> anyhow::Result<()> {
        let slot = self.node(i)?;
        config::set_transport(&slot.config, section)?;
        let proc = slot
            .proc
            .as_ref()
            .with_context(|| format!("node n{i} is not running"))?;
        proc.signal(rustix::process::Signal::HUP);
        Ok(())
    }

    /// A server or an agent.
    pub fn slot(&self, who: Who) -> anyhow::Result<&NodeSlot> {
        match who {
            Who::Node(i) => self.node(i),
            Who::Agent(k) => self.agent(k),
        }
    }

    /// Runs `tern ARGS... --json --data-dir DIR --key LAB_KEY` in node
    /// `i`'s namespace (with a key of the lab's pool, an admin) and parses
    /// its JSON output.
    pub async fn cli(&self, i: usize, args: &[&str]) -> anyhow::Result<Value> {
        self.cli_of(Who::Node(i), args).await
    }

    /// [`Cluster::cli`] on a server or an agent.
    pub async fn cli_of(&self, who: Who, args: &[&str]) -> anyhow::Result<Value> {
        let slot = self.slot(who)?;
        let dir = slot.dir.display().to_string();
        let tern = self.tern.display().to_string();
        // The global flags go after the subcommand and before any `--`
        // (what follows `--` is a workload's argv).
        let split = args.iter().position(|a| *a == "--").unwrap_or(args.len());
        let mut argv: Vec<String> = vec![tern];
        argv.extend(args[..split].iter().map(|a| (*a).to_owned()));
        // The lab's key: the node's own is an admin on the first node only
        // (members of other nodes may read, not write).
        let key = slot.dir.with_file_name(format!(
            "{}.lab-cli.key",
            slot.dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
        crate::keys::write_cli_key(&key)
            .with_context(|| format!("writing the CLI key {}", key.display()))?;
        argv.extend([
            "--json".to_owned(),
            "--data-dir".to_owned(),
            dir,
            "--key".to_owned(),
            key.display().to_string(),
        ]);
        argv.extend(args[split..].iter().map(|a| (*a).to_owned()));
        let ns = slot.ns.clone();
        let out = tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
            ns.exec(&refs)
        })
        .await??;
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "`tern {}` on {who} printed no JSON: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Node `i`'s status (`tern status --json`).
    pub async fn status(&self, i: usize) -> anyhow::Result<Value> {
        self.cli(i, &["status"]).await
    }

    /// Waits until every node is a member, the first
    /// `DEFAULT_MAX_VOTERS` (5) of them voters (later joiners stay
    /// learners) and a leader is known; records every node's Raft id.
    pub async fn wait_formed(&mut self) -> anyhow::Result<()> {
        let members = self.nodes.len();
        // Joiners beyond `[cluster] max_voters` (the default) stay learners.
        let want = members.min(tern_cluster::admission::DEFAULT_MAX_VOTERS);
        let deadline = Instant::now() + CONVERGE_BOUND;
        loop {
            let last = match self.status(1).await {
                Ok(s) => {
                    let all = s["members"].as_array().map_or(0, Vec::len);
                    let voters = s["members"]
                        .as_array()
                        .map(|m| m.iter().filter(|m| m["voter"] == Value::Bool(true)).count())
                        .unwrap_or(0);
                    if voters == want && all == members && s["leader_id"].as_u64().unwrap_or(0) != 0
                    {
                        break;
                    }
                    format!(
                        "{all} of {members} members, {voters} of {want} voters, leader {}",
                        s["leader_id"]
                    )
                }
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                bail!("the cluster did not form within {CONVERGE_BOUND:?} ({last})");
            }
            tokio::time::sleep(POLL).await;
        }
        for i in self.indices() {
            let s = self.status(i).await?;
            self.node_mut(i)?.raft_id = s["node_id"].as_u64();
        }
        Ok(())
    }

    /// The index of the leader as the running nodes agree (the first
    /// running node that names one), waiting (bounded) for one.
    pub async fn leader(&mut self) -> anyhow::Result<usize> {
        let deadline = Instant::now() + CONVERGE_BOUND;
        loop {
            for i in self.indices() {
                if !self.is_running(i) {
                    continue;
                }
                if let Ok(s) = self.status(i).await
                    && let Some(id) = s["leader_id"].as_u64().filter(|id| *id != 0)
                    && let Some(index) = self
                        .nodes
                        .iter()
                        .find(|n| n.raft_id == Some(id))
                        .map(|n| n.index)
                    && self.is_running(index)
                {
                    return Ok(index);
                }
            }
            if Instant::now() > deadline {
                bail!("no leader among the running nodes within {CONVERGE_BOUND:?}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until node `i` reports a policy for which `pred` holds
    /// (`tern transport show --json`).
    pub async fn wait_policy(
        &self,
        i: usize,
        pred: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        self.wait_policy_of(Who::Node(i), pred).await
    }

    /// [`Cluster::wait_policy`] on a server or an agent.
    pub async fn wait_policy_of(
        &self,
        who: Who,
        pred: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + CONVERGE_BOUND;
        let mut last;
        loop {
            match self.cli_of(who, &["transport", "show"]).await {
                Ok(p) if pred(&p) => return Ok(p),
                Ok(p) => last = format!("last shown: {p}"),
                Err(e) => last = format!("last error: {e:#}"),
            }
            if Instant::now() > deadline {
                bail!("{who} did not apply the new policy within {CONVERGE_BOUND:?}; {last}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Scrapes node `i`'s `/metrics` (from its own namespace).
    pub async fn metrics(&self, i: usize) -> anyhow::Result<Metrics> {
        let slot = self.node(i)?;
        let addr = slot
            .node_file()?
            .metrics
            .with_context(|| format!("node n{i} serves no /metrics"))?;
        let addr = if addr.ip().is_unspecified() {
            std::net::SocketAddr::new(slot.iface.addr.addr.into(), addr.port())
        } else {
            addr
        };
        let text = slot
            .ns
            .run_task(move || async move {
                tern_process_kit::scrape(addr)
                    .await
                    .map_err(anyhow::Error::from)
            })
            .await?;
        Ok(Metrics::parse(&text))
    }

    /// Every node's metrics summed: `sum` of `name` with `labels` over the
    /// nodes that answer.
    pub async fn metric_sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut total = 0.0;
        for i in self.indices() {
            if let Ok(m) = self.metrics(i).await {
                total += m.sum(name, labels);
            }
        }
        total
    }

    /// Every node's metrics now, in node order (a node that does not
    /// answer gives an empty set).
    pub async fn snapshot(&self) -> Vec<Metrics> {
        let mut v = Vec::new();
        for i in self.indices() {
            v.push(self.metrics(i).await.unwrap_or_default());
        }
        v
    }

    /// Starts steady client traffic from the client namespace to every
    /// node, with a key of the lab's pool.
    pub fn traffic(&self, spec: TrafficSpec) -> anyhow::Result<Traffic> {
        self.traffic_to(spec, &self.indices())
    }

    /// Starts steady client traffic from the client namespace to the
    /// nodes `nodes` only (1-based indices).
    pub fn traffic_to(&self, spec: TrafficSpec, nodes: &[usize]) -> anyhow::Result<Traffic> {
        let files: Vec<(usize, NodeFile)> = self
            .nodes
            .iter()
            .filter(|n| nodes.contains(&n.index))
            .filter_map(|n| n.file.clone().map(|f| (n.index, f)))
            .collect();
        let client = self.client.clone();
        Traffic::start(
            &move |task| client.spawn_task(task),
            crate::keys::client_key(),
            files,
            spec,
        )
    }

    /// The node files of every node that has started (for [`Traffic`]).
    pub fn node_files(&self) -> Vec<NodeFile> {
        self.nodes.iter().filter_map(|n| n.file.clone()).collect()
    }

    /// Stops every node (SIGTERM, bounded); returns the indices of nodes
    /// that did not exit cleanly.
    pub async fn shutdown(&mut self) -> Vec<usize> {
        let mut unclean = Vec::new();
        for i in self.indices().into_iter().rev() {
            if !self.stop(i).await.unwrap_or(false) {
                unclean.push(i);
            }
        }
        unclean
    }
}

/// Latencies of the successful calls among `records` for which `pred`
/// holds.
pub fn latencies(records: &[CallRecord], pred: impl Fn(&CallRecord) -> bool) -> Latencies {
    let mut l = Latencies::default();
    for r in records.iter().filter(|r| r.error.is_none() && pred(r)) {
        l.push(r.took);
    }
    l
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_are_generated() {
        let seed = NodeFile {
            id: "ab".repeat(32),
            grpc: Some("https://10.77.0.11:7400".into()),
            iroh: Some(vec!["10.77.0.11:7401".parse().unwrap()]),
            metrics: None,
            pid: 1,
        };
        let t = dual_section(&["all_except_raft"], RaftTransport::Iroh);
        let mut c = node_config(
            Path::new("/tmp/x/n2"),
            "10.77.0.12".parse().unwrap(),
            Some(&seed),
            &t,
        );
        let text = c.to_toml().unwrap();
        assert!(text.contains("grpc = \"10.77.0.12:7400\""), "{text}");
        let checked = Config::parse(&text).unwrap();
        assert_eq!(checked.seeds[0].1.grpc, seed.grpc);
        assert_eq!(checked.config.transport, Some(t));
        assert_eq!(checked.admins.len(), crate::keys::CLIENT_KEYS);
        listen_any(&mut c);
        let text = c.to_toml().unwrap();
        assert!(text.contains("iroh = \"0.0.0.0:7401\""), "{text}");
        assert!(text.contains("grpc = \"10.77.0.12:7400\""), "{text}");
    }
}
